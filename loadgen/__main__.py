"""`python -m loadgen run …` and `python -m loadgen compare A.json B.json …` (see DESIGN.md)."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import asyncio
import os
import sys

from loadgen import report as rep
from loadgen.metrics import summarize
from loadgen.runner import run
from loadgen.targets import open_target
from loadgen.workloads import WorkloadConfig, WorkloadError, build_workload

FALLBACK_VOCAB = 1000


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen", description="Open-loop load generator for LLM servers")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="drive a target with a workload and write a report")
    r.add_argument("--target", required=True, help="grpc://HOST:PORT | http://HOST:PORT | sim:CONFIG")
    r.add_argument("--trace", required=True,
                   help="Azure CSV, ShareGPT stats CSV, Mooncake JSONL, or synthetic:n=N,input=L,output=L")
    r.add_argument("--max-requests", type=int)
    r.add_argument("--sample", action="store_true", help="a seeded sample of --max-requests rows, not the first")
    r.add_argument("--time-scale", type=float, default=1.0, help="multiply trace offsets (0.5 = twice as fast)")
    r.add_argument("--rate", type=float, help="requests/s (rescales trace arrivals, or drives --arrival)")
    r.add_argument("--arrival", choices=("trace", "poisson", "gamma", "constant"))
    r.add_argument("--cv", type=float, default=1.0, help="inter-arrival CV for --arrival gamma")
    r.add_argument("--max-input-tokens", type=int)
    r.add_argument("--max-output-tokens", type=int)
    r.add_argument("--length-mode", choices=("clip", "scale"), default="clip")
    r.add_argument("--block-tokens", type=int, default=512, help="tokens per Mooncake hash block")
    r.add_argument("--vocab-size", type=int, help="default: asked of the target, else %d" % FALLBACK_VOCAB)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--model", help="model name for http targets (default: the server's first)")
    r.add_argument("--tokenizer", help="tokenizer.json (or its directory) to send text to http servers that "
                                       "refuse token-id prompts")
    r.add_argument("--ttft-slo", type=float, help="seconds")
    r.add_argument("--tpot-slo", type=float, help="seconds")
    r.add_argument("--max-concurrency", type=int, help="cap on requests in flight (default: none, open loop)")
    r.add_argument("--request-timeout", type=float, default=600.0)
    r.add_argument("--warmup", type=int, default=0,
                   help="send the workload's first N requests one at a time before measuring (not recorded); "
                        "a failed warm-up request stops the run")
    r.add_argument("--search-goodput", action="store_true",
                   help="bisect over rates for the highest meeting --attainment of both SLOs")
    r.add_argument("--attainment", type=float, default=0.9)
    r.add_argument("--search-steps", type=int, default=5, help="bisection steps once the rate is bracketed")
    r.add_argument("--bracket-steps", type=int, default=6,
                   help="doublings (or halvings) of --rate at most while looking for a bracket")
    r.add_argument("--out", required=True, help="report JSON")
    r.add_argument("--csv", help="per-request CSV")
    r.add_argument("--plot", help="PNG of latency CDFs (and with --search-goodput, <name>_search.png)")
    r.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("compare", help="side-by-side table of reports, with ratios to the first")
    c.add_argument("reports", nargs="+")
    c.add_argument("--names", help="comma-separated names (default: file names)")
    c.add_argument("--plot-dir", help="write one PNG per metric here")
    return p


def _config(args, vocab: int, rate: float | None, prompt_salt: int = 0) -> WorkloadConfig:
    return WorkloadConfig(trace=args.trace, max_requests=args.max_requests, sample=args.sample, arrival=args.arrival,
                          rate=rate, time_scale=args.time_scale, cv=args.cv, max_input_tokens=args.max_input_tokens,
                          max_output_tokens=args.max_output_tokens, length_mode=args.length_mode,
                          block_tokens=args.block_tokens, vocab_size=vocab, seed=args.seed, prompt_salt=prompt_salt)


async def _run(args) -> tuple[dict, list]:
    target = open_target(args.target, timeout_s=args.request_timeout, model=args.model,
                         tokenizer=args.tokenizer)
    async with target:
        vocab = args.vocab_size or await target.vocab_size()
        if vocab is None:
            print(f"loadgen: the target does not state its vocabulary; using {FALLBACK_VOCAB} (--vocab-size)",
                  file=sys.stderr)
            vocab = FALLBACK_VOCAB
        if args.warmup < 0:
            raise WorkloadError(f"--warmup must be >= 0, got {args.warmup}")
        if args.warmup:
            # Another seed: the same lengths with other tokens, so no prompt of the run is cached by it.
            warm = build_workload(dataclasses.replace(_config(args, vocab, args.rate), seed=args.seed + 1_000_003))
            await _warm_up(target, warm, args.warmup)

        probes = itertools.count()

        async def measure(rate):
            # every probe after the first gets fresh prompt tokens: no probe is served from the
            # prefix cache an earlier one filled
            workload = build_workload(_config(args, vocab, rate, prompt_salt=next(probes)))
            results, wall = await run(workload, target, max_concurrency=args.max_concurrency,
                                      progress=not args.no_progress)
            return workload, results, summarize(results, args.ttft_slo, args.tpot_slo, wall)

        search = None
        if args.search_goodput:
            search, best = await _search(args, measure)
            workload, results, summary = best
        else:
            workload, results, summary = await measure(args.rate)
        options = {k: v for k, v in vars(args).items() if k not in ("cmd", "out", "csv", "plot")}
        report = rep.build_report(target=target.describe(), workload=workload.describe(), seed=args.seed,
                                  summary=summary, options=options, search=search)
        return report, results


async def _warm_up(target, workload, n: int) -> None:
    """Send the first ``n`` requests of ``workload`` one after another and drop their timings, so
    one-off costs (first kernels, connection set-up, caches) stay out of the measured runs."""
    for spec in workload.requests[:n]:
        try:
            async for _ in target.stream(workload.prompt(spec), spec.output_tokens):
                pass
        except Exception as e:
            raise WorkloadError(f"warm-up request failed: {e}; is the target serving?") from e
    print(f"loadgen: warmed up with {min(n, len(workload.requests))} requests", file=sys.stderr)


async def _search(args, measure):
    """Bracket then bisect the offered rate; the best run is the highest rate meeting the attainment."""
    if args.ttft_slo is None and args.tpot_slo is None:
        raise WorkloadError("--search-goodput needs --ttft-slo and/or --tpot-slo")
    probes, runs = [], {}

    async def passes(rate) -> bool:
        wl, results, summary = await measure(rate)
        runs[rate] = (wl, results, summary)
        probes.append({"rate": rate, "attainment": summary["attainment"],
                       "goodput_requests_s": summary["goodput_requests_s"], "ttft": summary["ttft"],
                       "tpot": summary["tpot"], "completed": summary["completed"], "failed": summary["failed"]})
        print(f"loadgen: rate {rate:.4g} req/s → attainment {summary['attainment']:.3f}", file=sys.stderr)
        return (summary["attainment"] or 0.0) >= args.attainment

    start = args.rate or build_workload(_config(args, FALLBACK_VOCAB, None)).describe()["offered_rate_rps"] or 1.0
    lo, hi = None, None
    if await passes(start):
        lo = start
        for _ in range(args.bracket_steps):
            if not await passes(lo * 2):
                hi = lo * 2
                break
            lo *= 2
    else:
        hi = start
        for _ in range(args.bracket_steps):
            if await passes(hi / 2):
                lo = hi / 2
                break
            hi /= 2
    if lo is not None and hi is not None:
        for _ in range(args.search_steps):
            mid = (lo + hi) / 2
            if await passes(mid):
                lo = mid
            else:
                hi = mid
    best = runs[lo] if lo is not None else runs[min(runs)]
    # bracketed False: the doubling ran out of steps still passing (best is a lower bound) or never passed
    search = {"target_attainment": args.attainment, "best_rate_rps": lo, "bracketed": lo is not None and hi is not None,
              "best_goodput_requests_s": best[2]["goodput_requests_s"] if lo is not None else 0.0,
              "probes": probes}
    return search, best


def cmd_run(args) -> int:
    try:
        report, results = asyncio.run(_run(args))
    except (WorkloadError, ValueError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    rep.write_json(report, args.out)
    if args.csv:
        rep.write_csv(results, args.csv)
    if args.plot:
        rep.plot_cdfs(results, args.plot, title=f"{args.target} · {os.path.basename(args.trace)}")
        if report["search"]:
            rep.plot_search(report["search"], os.path.splitext(args.plot)[0] + "_search.png")
    s = report["summary"]
    print(f"loadgen: {s['completed']} completed, {s['failed']} failed, {s['throughput_tokens_s']:.1f} tok/s"
          f", attainment {s['attainment']}; report {args.out}", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    try:
        loaded = [rep.load_report(p) for p in args.reports]
    except (OSError, ValueError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    names = args.names.split(",") if args.names else [os.path.splitext(os.path.basename(p))[0] for p in args.reports]
    if len(names) != len(loaded):
        print("loadgen: --names needs one name per report", file=sys.stderr)
        return 2
    pairs = list(zip(names, loaded))
    print(rep.compare_table(pairs))
    if args.plot_dir:
        os.makedirs(args.plot_dir, exist_ok=True)
        rep.plot_compare(pairs, args.plot_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
