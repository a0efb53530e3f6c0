"""Token-chunked (Sarathi-Serve) against layered ("From Tokens to Layers") prefill beside running
decodes: how well each protects the decodes' inter-token time, and what each costs the prompt.

One engine of `small` on one thread (an adaptive-pools instance in BOTH runs on one pinned core),
in this process. A decode batch runs (`--batch` requests of `--context`-token prompts, generating
past the end of the run); then `--prompts` prompts of `--prompt-len` tokens are sent one after
another (each when the previous one got its first token) while the decodes go on, under each mode
and each mixed-prefill cap. Every step is timed. Per (mode, cap), one JSON line:

- `decode_only_ms`: median decode-only step before the prompts (the baseline);
- `mixed_step_ms_p50/p90/max`: steps that carried prompt work (each is one inter-token gap of every
  running decode: the TPOT cost);
- `decode_itl_ms_mean`: mean step over the prompts' window (what the decodes' TPOT becomes);
- `extra_ms_per_prompt_token`: (sum of mixed steps - as many decode-only steps) / prompt tokens:
  the decodes' total delay per prompt token (lower: the prompt rides along more cheaply);
- `ttft_ms_mean`: a prompt's time from its first scheduled step to its first token; `steps_per_prompt`.

    python benchmarks/bench_mixed_prefill.py [--caps 32,64,128] [--batch 16] [--prompt-len 420]

The host line comes first; modes alternate per cap (chunked, layered, layered, chunked, ...) so a
drifting host favours neither.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.host_info import host_line  # noqa: E402


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def run_case(engine, mode: str, cap: int, args, seed: int) -> dict:
    """One (mode, cap) measurement on a fresh decode batch; the engine is left empty."""
    from services.engine.sampling_params import SamplingParams

    sched = engine.scheduler
    sched.config = dataclasses.replace(sched.config, mixed_prefill_mode=mode)
    sched.mixed_prefill_tokens = cap
    vocab = engine.config.model.vocab_size
    rng = random.Random(seed)
    long_run = SamplingParams(max_tokens=4000, ignore_eos=True, detokenize=False)
    decodes = [engine.add_request(_prompt(rng, args.context, vocab), long_run) for _ in range(args.batch)]
    while any(engine.scheduler.requests[r].num_output_tokens == 0 for r in decodes):
        engine.step()                                       # every decode has its first token
    base = []
    for _ in range(args.baseline_steps):
        t0 = time.perf_counter()
        engine.step()
        base.append(time.perf_counter() - t0)
    mixed, window, ttfts, steps_per = [], [], [], []
    one = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    for i in range(args.prompts):
        rid = engine.add_request(_prompt(rng, args.prompt_len, vocab), one, request_id=f"p{seed}-{i}")
        first, steps = None, 0
        while True:
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            window.append(dt)
            mixed.append(dt)
            steps += 1
            first = first if first is not None else t0
            if any(o.request_id == rid for o in outs):
                ttfts.append(time.perf_counter() - first)
                steps_per.append(steps)
                break
    for r in decodes:
        engine.abort_request(r)
    engine.check_integrity()
    assert engine.kv.num_used_blocks == 0, "blocks left behind"
    decode_only = statistics.median(base)
    q = sorted(mixed)
    return {"mode": mode, "cap": cap, "batch": args.batch, "context": args.context, "prompt_len": args.prompt_len,
            "prompts": args.prompts, "decode_only_ms": round(decode_only * 1e3, 2),
            "mixed_step_ms_p50": round(q[len(q) // 2] * 1e3, 2), "mixed_step_ms_p90": round(q[int(len(q) * 0.9)] * 1e3, 2),
            "mixed_step_ms_max": round(q[-1] * 1e3, 2), "decode_itl_ms_mean": round(statistics.fmean(window) * 1e3, 2),
            "extra_ms_per_prompt_token": round((sum(mixed) - decode_only * len(mixed)) * 1e3
                                               / (args.prompts * args.prompt_len), 4),
            "ttft_ms_mean": round(statistics.fmean(ttfts) * 1e3, 1), "steps_per_prompt": statistics.fmean(steps_per)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--caps", default="32,64,128")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=420)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--baseline-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per cap; each figure is the median")
    a = p.parse_args()
    from services.engine.builder import build_engine

    engine = build_engine(a.model, dtype=a.dtype, num_threads=a.threads, max_num_batched_tokens=2048,
                          max_model_len=4096, kv_memory_gib=2, enable_prefix_caching=False)
    print(json.dumps({"host": host_line(), "dtype": str(engine.config.dtype).removeprefix("torch."),
                      "threads": a.threads, "num_layers": engine.config.model.num_layers}), flush=True)
    run_case(engine, "chunked", 64, a, seed=999)            # warm-up
    seed = 0
    for cap in (int(c) for c in a.caps.split(",")):
        runs: dict[str, list[dict]] = {"chunked": [], "layered": []}
        for r in range(a.rounds):
            for mode in (("chunked", "layered") if r % 2 == 0 else ("layered", "chunked")):
                seed += 1
                runs[mode].append(run_case(engine, mode, cap, a, seed))
        lines = {}
        for mode, rs in runs.items():
            line = {k: (statistics.median(x[k] for x in rs) if isinstance(rs[0][k], float) else rs[0][k])
                    for k in rs[0]}
            lines[mode] = line
            print(json.dumps(line), flush=True)
        c, l_ = lines["chunked"], lines["layered"]
        print(json.dumps({"compare": f"cap {cap}", "layered_over_chunked": {
            k: round(l_[k] / c[k], 3) for k in ("mixed_step_ms_p90", "mixed_step_ms_max", "decode_itl_ms_mean",
                                                 "extra_ms_per_prompt_token", "ttft_ms_mean") if c[k]}}), flush=True)


if __name__ == "__main__":
    from services.allocator import use_tcmalloc
    use_tcmalloc()
    main()
