"""`make bench-goodput`: goodput of Tandem (fixed 1P+1D, adaptive, colocated x2, one instance on every
core) and vLLM under SLOs scaled from this host's own unloaded latencies, all in one run.

    python -m loadgen.bench_goodput [--trace FILE] [--systems vllm,fixed,adaptive,colocated,single]

1. SLO scale (DistServe): on the reference system (vLLM; without it, the fastest Tandem system,
   and the report says so) a few requests of the trace slice's mean prompt length are sent one at
   a time; the medians of their TTFT and TPOT (TPOT at batch 1) times 3 are the tight SLOs, times
   10 the relaxed ones.
2. Each system in turn, on the same dtype (the host's auto dtype), the same trace slice (the first
   rows of --trace) and the same arrival process (the trace's own, rescaled to each probe's rate):
   one series of probes, each ~--probe-s seconds long, judged under both levels at once
   (loadgen/goodput.py: ascend, descend, bisect; a probe stops once its verdict is certain).
3. In --out-dir: summary.json (every system, probe and ratio), <system>.csv (every request of every
   probe, with Tandem's TTFT breakdown), latency_vs_rate_<level>.png. On stdout: the table, then one
   JSON line {"tight": {"ttft_slo_s", "tpot_slo_s", "vllm", "fixed", "adaptive", "colocated", "single"}, "relaxed": …}
   with goodput in requests/s (null for a system that could not run).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

from loadgen import bench_report, report
from loadgen.bench_systems import DEFAULT_SYSTEMS, SYSTEMS, Options, Unavailable, host_dtype, start_system
from loadgen.goodput import (LEVELS, SCALES, Probe, SearchConfig, Slo, Step, clearly_lost, decided, goodput,
                             next_probe, pick_reference, probe_duration_s, probe_requests, slo_levels,
                             start_rate, unloaded_latency, verdicts)
from loadgen.metrics import RequestResult, summarize
from loadgen.runner import STOPPED, run, run_sequential
from loadgen.targets import open_target
from loadgen.workloads import WorkloadConfig, WorkloadError, build_workload

TRACE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces",
                                      "AzureLLMInferenceTrace_conv.csv"))
FALLBACK_VOCAB = 32000


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_goodput", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--trace", default=TRACE, help="any trace loadgen reads (Azure CSV, ShareGPT stats, Mooncake, "
                                                  "synthetic:…); default: the Azure 2023 conversation trace")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, of {', '.join(SYSTEMS)} (default: {', '.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--skip-vllm", action="store_true", help="drop vllm from --systems")
    p.add_argument("--max-input-tokens", type=int, default=512, help="clip prompts")
    p.add_argument("--max-output-tokens", type=int, default=128, help="clip outputs")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both SLOs")
    p.add_argument("--probe-s", type=float, default=60.0, help="seconds of arrivals per probe")
    p.add_argument("--min-requests", type=int, default=20, help="fewest requests in a probe")
    p.add_argument("--max-requests", type=int, default=1000,
                   help="most requests in a probe: the trace slice (its mean prompt sets the SLO measurement)")
    p.add_argument("--budget-s", type=float, default=210.0,
                   help="seconds of probes per system: no probe starts that would end past it")
    p.add_argument("--reference-budget-s", type=float, default=360.0,
                   help="the same for vLLM when it sets the SLOs: its brackets are where every other system is "
                        "probed first, so they are worth closing")
    p.add_argument("--min-rate", type=float, default=0.1, help="failing here counts as goodput 0")
    p.add_argument("--max-rate", type=float, default=64.0)
    p.add_argument("--start-concurrency", type=float, default=4.0,
                   help="first probe at this many requests in flight at the unloaded latency (Little's law); "
                        "systems after the reference start at its bracket ends instead")
    p.add_argument("--seeds", default="",
                   help="comma-separated rates (req/s) every system probes first; default: the reference's "
                        "bracket ends once vLLM has been searched")
    p.add_argument("--reference-latency", default="",
                   help="TTFT,TPOT in seconds: set the SLOs from these unloaded latencies (e.g. vLLM's from an "
                        "earlier run's summary.json, reference.ttft_s / tpot_s) instead of measuring a reference; "
                        "for A/B runs of Tandem systems without vLLM. The report names them as given")
    p.add_argument("--resolution", type=float, default=1.25, help="stop bisecting once hi/lo is at most this")
    p.add_argument("--unloaded-requests", type=int, default=5, help="sequential requests that set the SLOs")
    p.add_argument("--unloaded-output-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="unrecorded sequential requests to each system first")
    p.add_argument("--cooldown-s", type=float, default=3.0, help="pause after a probe stopped early")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pin", action="store_true", help="do not pin Tandem workers to cores")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out-dir", default="bench-goodput")
    return p


@dataclass
class Run:
    """What one invocation knows: its options, the workload slice, the SLOs once measured."""
    args: argparse.Namespace
    opts: Options
    mean_input: int
    mean_output: float
    slos: dict[str, Slo] | None = None
    seeds: tuple[tuple[float, str | None], ...] = ()   # (rate, level): every later search probes them first
    systems: dict[str, dict] = field(default_factory=dict)

    def log(self, msg: str) -> None:
        print(f"bench-goodput: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ per system

def _config(args, vocab: int, *, trace: str | None = None, max_requests: int | None = None, rate: float | None = None,
            max_output: int | None = None, seed: int | None = None, salt: int = 0) -> WorkloadConfig:
    return WorkloadConfig(trace=trace or args.trace, max_requests=max_requests, rate=rate,
                          max_input_tokens=args.max_input_tokens,
                          max_output_tokens=max_output or args.max_output_tokens, vocab_size=vocab,
                          seed=args.seed if seed is None else seed, prompt_salt=salt)


async def _vocab(target, handle) -> int:
    return handle.vocab or await target.vocab_size() or FALLBACK_VOCAB


async def measure_unloaded(run_: Run, handle) -> tuple[float, float]:
    """Warm the system up, then (median TTFT, median TPOT) of sequential mean-length requests."""
    args = run_.args
    async with open_target(handle.url, timeout_s=args.request_timeout) as target:
        vocab = await _vocab(target, handle)
        def sequential(n: int, seed: int):       # arrivals are unused: each request waits for the previous one
            spec = f"synthetic:n={n},input={run_.mean_input},output={args.unloaded_output_tokens}"
            return run_sequential(build_workload(_config(args, vocab, trace=spec, rate=1.0, seed=seed,
                                                         max_output=args.unloaded_output_tokens)), target)

        if args.warmup:
            await sequential(args.warmup, args.seed + 7)
        results = await sequential(args.unloaded_requests, args.seed + 11)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} unloaded requests failed: {failed[0]}")
    return unloaded_latency(results)


async def search(run_: Run, name: str, handle, unloaded: tuple[float, float]) -> dict:
    """The probes of one system; returns its record (see bench_report.system_record). Every request
    of every probe goes to <out-dir>/<name>.csv, also when the search fails part way."""
    args = run_.args
    cfg = SearchConfig(start=start_rate(*unloaded, run_.mean_output, args.min_rate, args.max_rate,
                                        args.start_concurrency),
                       resolution=args.resolution, min_rate=args.min_rate, max_rate=args.max_rate, seeds=run_.seeds)
    probes: list[Probe] = []
    records: list[dict] = []
    rows: list[dict] = []
    began, stop_reason = time.monotonic(), "bracketed"
    try:
        async with open_target(handle.url, timeout_s=args.request_timeout) as target:
            vocab = await _vocab(target, handle)
            while (step := next_probe(probes, cfg)) is not None:
                n = probe_requests(step.rate, args.probe_s, args.min_requests, args.max_requests)
                budget_s = args.reference_budget_s if name == "vllm" else args.budget_s
                if probes and time.monotonic() - began + probe_duration_s(n, step.rate) > budget_s:
                    stop_reason = "budget"
                    break
                probe, record, results = await _probe(run_, target, vocab, step, n)
                probes.append(probe)
                records.append(record)
                rows += [{"probe": len(records), "rate": step.rate, **r.row()} for r in results]
                run_.log(f"{name}: {step.rate:g} req/s x {n} in {record['wall_s']:.0f} s"
                         + (" (stopped: verdict certain)" if record["stopped_early"] else "") + " → "
                         + ", ".join(f"{lv} {record[lv]['attainment']:.2f} "
                                     + {True: "pass", False: "fail", None: "undecided"}[probe.passed[lv]]
                                     for lv in LEVELS))
                if record["stopped_early"]:
                    await asyncio.sleep(args.cooldown_s)   # let the server finish aborting what was cut off
    finally:
        report.write_rows(rows or [{"probe": None, "rate": None, **RequestResult(0, 0.0).row()}],
                          os.path.join(args.out_dir, f"{name}.csv"), header_only=not rows)
    return bench_report.system_record("ok", unloaded=unloaded, probes=records,
                                      goodputs={lv: goodput(probes, lv, cfg) for lv in LEVELS},
                                      start_rate=cfg.start, seeds=[list(x) for x in cfg.seeds], search_s=time.monotonic() - began, stop_reason=stop_reason)


async def _probe(run_: Run, target, vocab: int, step: Step, n: int) -> tuple[Probe, dict, list[RequestResult]]:
    """One probe of `n` requests at `step.rate`, stopped once its verdict is certain (goodput.py)."""
    args, slos = run_.args, run_.slos
    # the salt gives each rate its own prompt tokens (no prefix-cache hits from an earlier probe),
    # the same for every system
    workload = build_workload(_config(args, vocab, max_requests=n, rate=step.rate, salt=1 + round(step.rate * 1000)))
    why: dict = {}
    ended: dict[str, dict] = {lv: {} for lv in LEVELS}

    def stop(results, now) -> bool:
        lost = {lv: clearly_lost(results, now, slos[lv], args.attainment, ended[lv]) for lv in LEVELS}
        if all(lost[lv] for lv in step.needs):
            why.update(kind="lost", lost=lost)
        elif decided(results, now, slos.values()):
            why.update(kind="decided", lost=lost)
        return bool(why)

    results, wall = await run(workload, target, progress=not args.no_progress, stop=stop)
    stopped = any(r.error == STOPPED for r in results)
    sums = {lv: summarize(results, slos[lv].ttft_s, slos[lv].tpot_s, wall) for lv in LEVELS}
    verdict = verdicts({lv: sums[lv]["attainment"] for lv in LEVELS}, args.attainment,
                       stopped and why.get("kind") == "lost", why.get("lost", {}))
    s = sums[LEVELS[0]]            # latencies and counts do not depend on the level
    record = {"rate": step.rate, "requests": n, "wall_s": wall, "stopped_early": stopped,
              "decides": sorted(step.needs), "completed": s["completed"],
              "failed": sum(1 for r in results if r.error and r.error != STOPPED),
              "ttft": s["ttft"], "tpot": s["tpot"], "e2e": s["e2e"], "throughput_requests_s": s["throughput_requests_s"],
              **{lv: {"attainment": sums[lv]["attainment"], "passed": verdict[lv]} for lv in LEVELS},
              "errors": s["errors"]}
    return Probe(step.rate, verdict), record, results


def _failed(name: str, e: BaseException, run_: Run, **extra) -> dict:
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    run_.log(f"{name}: failed: {reason}")
    traceback.print_exc(file=sys.stderr)
    return bench_report.system_record("failed", reason, **extra)


def probe_system(run_: Run, name: str, handle, unloaded: tuple[float, float] | None = None) -> dict:
    """Measure (when not given) and search one running system; a failure is recorded, not raised."""
    try:
        if unloaded is None:
            unloaded = asyncio.run(measure_unloaded(run_, handle))
        run_.log(f"{name}: unloaded TTFT {unloaded[0]:.4f} s, TPOT {unloaded[1]:.4f} s")
        return asyncio.run(search(run_, name, handle, unloaded))
    except Exception as e:       # noqa: BLE001 - one system's failure leaves the others
        return _failed(name, e, run_, unloaded=unloaded)


def run_system(run_: Run, name: str, unloaded: tuple[float, float] | None = None) -> None:
    """Start, measure (unless `unloaded` is known), search and stop one system; records the outcome."""
    opts = run_.opts
    if run_.slos is not None:       # the adaptive router protects the tight SLOs (the relaxed ones follow)
        opts = dataclasses.replace(opts, adaptive_slo=(run_.slos["tight"].ttft_s, run_.slos["tight"].tpot_s))
    try:
        with start_system(name, opts) as handle:
            run_.systems[name] = probe_system(run_, name, handle, unloaded)
    except Unavailable as e:
        run_.log(f"{name}: not run: {e}")
        run_.systems[name] = bench_report.system_record("unavailable", str(e))


# ------------------------------------------------------------------------------------- reference

def reference_from_vllm(run_: Run) -> dict | None:
    """Measure vLLM, set the SLOs from it and search it while it is up; None when it cannot run."""
    try:
        with start_system("vllm", run_.opts) as handle:
            try:
                unloaded = asyncio.run(measure_unloaded(run_, handle))
            except Exception as e:      # noqa: BLE001
                run_.systems["vllm"] = _failed("vllm", e, run_)
                return None
            run_.slos = slo_levels(*unloaded)
            ref = _reference("vllm", unloaded, run_)
            run_.systems["vllm"] = probe_system(run_, "vllm", handle, unloaded)
            run_.seeds = run_.seeds or reference_seeds(run_.systems["vllm"])
            return ref
    except Unavailable as e:
        run_.log(f"vllm: not run: {e}")
        run_.systems["vllm"] = bench_report.system_record("unavailable", str(e))
        return None


def reference_seeds(record: dict) -> tuple[float, ...]:
    """The rates a searched reference passed and failed at the edges of its brackets, each with its
    level (tight lo, hi, then relaxed lo, hi): the other systems are probed there first
    (goodput.SearchConfig.seeds), each only while its own level is still open there."""
    found = record.get("goodput") or {}
    return tuple((r, lv) for lv in LEVELS for r in (found.get(lv) or {}).get("bracket_rps", ()) if r)


def reference_from_tandem(run_: Run, names: list[str], why: str) -> tuple[dict | None, dict]:
    """Measure every Tandem system unloaded and set the SLOs from the fastest. The last one is
    searched while still up; the others are started again later. Returns (reference, measured)."""
    measured: dict[str, tuple[float, float]] = {}
    ref = None
    for i, name in enumerate(names):
        try:
            with start_system(name, run_.opts) as handle:
                try:
                    measured[name] = asyncio.run(measure_unloaded(run_, handle))
                except Exception as e:      # noqa: BLE001
                    run_.systems[name] = _failed(name, e, run_)
                    continue
                if i == len(names) - 1:
                    ref = _slos_from_fastest(run_, measured, why)
                    run_.systems[name] = probe_system(run_, name, handle, measured[name])
                else:
                    run_.log(f"{name}: unloaded TTFT {measured[name][0]:.4f} s, TPOT {measured[name][1]:.4f} s")
        except Unavailable as e:
            run_.log(f"{name}: not run: {e}")
            run_.systems[name] = bench_report.system_record("unavailable", str(e))
    if ref is None and measured:           # the last system could not run: the others still set the SLOs
        ref = _slos_from_fastest(run_, measured, why)
    return ref, measured


def _slos_from_fastest(run_: Run, measured: dict[str, tuple[float, float]], why: str) -> dict:
    fastest = pick_reference(measured, run_.args.unloaded_output_tokens)
    run_.slos = slo_levels(*measured[fastest])
    return _reference(fastest, measured[fastest], run_, note=f"{why}; SLOs from the fastest Tandem system")


def _reference(system: str, unloaded: tuple[float, float], run_: Run, note: str | None = None) -> dict:
    a = run_.args
    s = run_.slos
    run_.log(f"SLOs from {system} (unloaded TTFT {unloaded[0]:.4f} s, TPOT {unloaded[1]:.4f} s): "
             + "; ".join(f"{lv} TTFT <= {s[lv].ttft_s:.4g} s, TPOT <= {s[lv].tpot_s:.4g} s" for lv in LEVELS))
    return {"system": system, "ttft_s": unloaded[0], "tpot_s": unloaded[1], "scales": dict(SCALES), "note": note,
            "how": f"median of {a.unloaded_requests} sequential requests of {run_.mean_input} prompt tokens "
                   f"-> {a.unloaded_output_tokens} output tokens, after {a.warmup} warm-up requests"}


# ------------------------------------------------------------------------------------------- main

def _host() -> dict:
    """benchmarks/host_info.py's host line (CPU model, torch's CPU capability, cores, ISA features),
    plus the load average before this run started anything: others' work skews every figure."""
    from benchmarks.host_info import host_line
    host = host_line()
    host["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    return host


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = _parser().parse_args(argv)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        print(f"bench-goodput: --systems: unknown {unknown}; use {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    if args.skip_vllm and "vllm" in names:
        names.remove("vllm")
    names = [s for s in SYSTEMS if s in names]
    try:
        seeds = tuple((float(x), None) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        print(f"bench-goodput: --seeds: expected comma-separated rates in req/s, got {args.seeds!r}", file=sys.stderr)
        return 2
    given = None
    if args.reference_latency:
        try:
            given = tuple(float(x) for x in args.reference_latency.split(","))
        except ValueError:
            given = ()
        if len(given) != 2 or not all(x > 0 for x in given):
            print(f"bench-goodput: --reference-latency: expected TTFT,TPOT in seconds, both > 0 (e.g. 0.083,0.008), "
                  f"got {args.reference_latency!r}", file=sys.stderr)
            return 2
    if any(not r > 0 for r, _ in seeds):
        print(f"bench-goodput: --seeds: every rate must be > 0 req/s, got {args.seeds!r}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        # the rate only matters to a trace without timestamps (Poisson arrivals); CV does not depend on it
        slice_ = build_workload(_config(args, FALLBACK_VOCAB, max_requests=args.max_requests, rate=1.0)).describe()
    except WorkloadError as e:
        print(f"bench-goodput: {e}", file=sys.stderr)
        return 2
    dtype, dtype_source = host_dtype()
    run_ = Run(args, Options(args.model, dtype, args.out_dir, pin_cores=not args.no_pin),
               mean_input=max(1, round(slice_["input_tokens"]["mean"])), mean_output=slice_["output_tokens"]["mean"],
               seeds=seeds)
    host = _host()
    run_.log(f"host {json.dumps(host)}; dtype {dtype} ({dtype_source})")
    if host["load_avg_1m_at_start"] > 0.5 * (os.cpu_count() or 1):
        run_.log(f"WARNING: load average {host['load_avg_1m_at_start']} before starting: other work on this "
                 "host will slow every system and the SLO reference; figures are not comparable with a quiet run")

    ref, measured = None, {}
    if given is not None:
        run_.slos = slo_levels(*given)
        ref = _reference("given", given, run_, note="--reference-latency: SLOs from latencies given on the command "
                                                     "line, not measured in this run")
    elif "vllm" in names:
        ref = reference_from_vllm(run_)
    tandem = [s for s in names if s != "vllm"]
    if ref is None:
        why = ("vLLM not asked for (--systems)" if "vllm" not in names
               else f"vLLM could not run ({run_.systems['vllm']['reason']})")
        ref, measured = reference_from_tandem(run_, tandem, why)
    for name in (names if given is not None else tandem):
        if name not in run_.systems and run_.slos is not None:
            run_system(run_, name, measured.get(name))

    doc = bench_report.summary(
        host=host, dtype={"dtype": dtype, "source": dtype_source},
        workload={"description": _describe(args, slice_), "trace": args.trace, "slice": slice_, "model": args.model},
        reference=ref or {"system": None, "ttft_s": None, "tpot_s": None, "scales": dict(SCALES),
                          "how": "no system could run", "note": None},
        slos=run_.slos, attainment=args.attainment, systems=run_.systems, wall_s=time.monotonic() - started)
    bench_report.write_summary(doc, os.path.join(args.out_dir, "summary.json"))
    if run_.slos is not None:
        for lv in LEVELS:
            bench_report.plot_latency_vs_rate(doc, lv, os.path.join(args.out_dir, f"latency_vs_rate_{lv}.png"))
        print(bench_report.table(doc))
    print(f"wall {doc['wall_s']:.0f} s; summary, per-request CSVs and plots in {args.out_dir}/")
    print(json.dumps(doc["goodput"]), flush=True)
    return 0 if run_.slos is not None else 1


def _describe(args, slice_: dict) -> str:
    arrivals = ("the trace's arrivals rescaled to each probe's rate" if slice_["format"] in ("azure", "mooncake")
                else "Poisson arrivals at each probe's rate (the trace has no timestamps)")
    cv = slice_["interarrival_cv"]
    return (f"{args.trace}: first {slice_['requests']} requests (probes take the first n, n ~ rate x {args.probe_s:g} s), "
            f"prompts clipped to {args.max_input_tokens} (mean {slice_['input_tokens']['mean']:.0f}), outputs to "
            f"{args.max_output_tokens} (mean {slice_['output_tokens']['mean']:.0f}), {arrivals}"
            + (f" (inter-arrival CV {cv:.2f} over the slice)" if cv is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
