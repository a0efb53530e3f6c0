"""Load-only vs prefix-cache-aware routing on the same cluster shape, workload and arrivals.

    python -m benchmarks.bench_sched_prefix [--trace FILE|SPEC] [--model small] [--colocated 2]
        [--prefill P --decode D] [--rate R] [--max-requests N] [--num-blocks B] [--out-dir DIR]

Each policy gets a fresh cluster (cold caches, the router's --routing load or prefix, --pools
fixed, workers pinned one core each) and the same seeded schedule of requests; the open-loop
replay (loadgen) measures TTFT from each request's scheduled time. The default workload is
multi-application and multi-turn (loadgen/multiapp.py): a few shared system prompts and
conversations that re-send their history, which is where the cached overlap matters. Any trace
loadgen reads works too (Mooncake JSONL with hash_ids shares prefixes block by block).

Prints the host line, one JSON line per policy, then one JSON object with the headline:
{"prefix_vs_load_p90_ttft": R, ...}, R = prefix routing's P90 TTFT / load-only's (goal <= 0.5).
`prefix_vs_load(...)` returns the same figures for `make bench-sched`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.host_info import host_line
from loadgen import metrics as lg_metrics
from loadgen.runner import run_sync
from loadgen.targets import open_target
from loadgen.workloads import WorkloadConfig, build_workload
from tandem.local_cluster import LocalCluster

POLICIES = ("load", "prefix")
# Three applications (shared system prompts of 256-512 tokens), conversations of 4-8 turns that
# re-send their history (user messages of 96-192 tokens, answers of 32-64), about 1 s apart.
DEFAULT_TRACE = ("apps:conversations=40,turns=uniform:4:8,think=1,rate=1,"
                 "app=sys=512;input=uniform:96:192;output=uniform:32:64,"
                 "app=sys=384;input=uniform:96:192;output=uniform:32:64,"
                 "app=sys=256;input=uniform:96:192;output=uniform:32:64")
DEFAULT_RATE = 5.0                 # requests/s over the run: load-only routing queues here (small, 2 cores)
DEFAULT_NUM_BLOCKS = 1536          # per instance, 16-token blocks


def _policy_figures(results, wall: float) -> dict:
    s = lg_metrics.summarize(results, wall=wall)
    done = [r for r in results if r.ok]
    prompt = sum(r.input_tokens for r in done)
    cached = sum(int(r.info.get("cached_prompt_tokens", 0) or 0) for r in done)
    per_instance: dict[str, int] = {}
    for r in done:
        inst = r.info.get("prefill_instance", "?")
        per_instance[inst] = per_instance.get(inst, 0) + 1
    ttft = s["ttft"] or {}
    return {"p50_ttft": ttft.get("p50"), "p90_ttft": ttft.get("p90"), "p99_ttft": ttft.get("p99"),
            "mean_ttft": ttft.get("mean"), "cached_token_fraction": cached / prompt if prompt else None,
            "prompt_tokens": prompt, "cached_prompt_tokens": cached, "completed": s["completed"],
            "failed": s["failed"], "wall_s": wall, "throughput_tokens_s": s["throughput_tokens_s"],
            "e2e_p50": (s["e2e"] or {}).get("p50"), "requests_per_instance": dict(sorted(per_instance.items())),
            "errors": s["errors"]}


def prefix_vs_load(trace: str | None = None, *, model: str = "small", colocated: int = 2, prefill: int = 0,
                   decode: int = 0, rate: float | None = DEFAULT_RATE, max_requests: int | None = None,
                   max_input_tokens: int | None = 3072, max_output_tokens: int | None = 64,
                   num_blocks: int | None = DEFAULT_NUM_BLOCKS, block_tokens: int = 512, seed: int = 0,
                   dtype: str | None = None, pin_cores: bool = True, out_dir: str | None = None,
                   log=sys.stderr) -> dict:
    """Run the same workload under --routing load, then --routing prefix, each on a fresh cluster.

    trace: any trace or spec loadgen reads (None: DEFAULT_TRACE); rate: requests/s (None: the
    trace's own). Returns {"load": figures, "prefix": figures, "prefix_vs_load_p90_ttft": R,
    "prefix_vs_load_p50_ttft": R, "workload": ..., "cluster": ..., "host": ...}; figures has
    p50_ttft, p90_ttft (seconds), cached_token_fraction (prompt tokens served from a prefix cache),
    completed, failed, requests_per_instance and more. A ratio is None when a figure is missing.
    out_dir: also write prefix_vs_load.json and one per-request CSV per policy there."""
    from services.engine.loader import resolve_model
    vocab = resolve_model(model, weights=False).config.vocab_size
    workload = build_workload(WorkloadConfig(
        trace=trace or DEFAULT_TRACE, max_requests=max_requests, rate=rate, max_input_tokens=max_input_tokens,
        max_output_tokens=max_output_tokens, block_tokens=block_tokens, vocab_size=vocab, seed=seed))
    worker_args = ["--dtype", dtype] if dtype else []
    if num_blocks:
        worker_args += ["--num-blocks", str(num_blocks)]
    shape = dict(colocated=colocated, prefill=prefill, decode=decode)
    out: dict = {"host": host_line(), "workload": workload.describe(),
                 "cluster": {"model": model, **shape, "worker_args": worker_args, "pin_cores": pin_cores}}
    for policy in POLICIES:
        started = time.perf_counter()
        with LocalCluster(model, pin_cores=pin_cores, worker_args=worker_args, routing=policy, pools="fixed",
                          **shape) as c:
            warm, _ = run_sync(build_workload(WorkloadConfig(trace="synthetic:n=2,input=32,output=4", rate=1.0,
                                                             vocab_size=vocab, seed=seed + 99)),
                               open_target(f"grpc://{c.address}"), progress=False)
            results, wall = run_sync(workload, open_target(f"grpc://{c.address}"), progress=log is not None,
                                     out=log or sys.stderr)
        out[policy] = _policy_figures(results, wall)
        out[policy]["run_s"] = time.perf_counter() - started
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            _write_csv(os.path.join(out_dir, f"prefix_vs_load_{policy}.csv"), results)
    for key in ("p90_ttft", "p50_ttft"):
        base, new = out["load"][key], out["prefix"][key]
        out[f"prefix_vs_load_{key}"] = new / base if base and new is not None else None
    if out_dir:
        with open(os.path.join(out_dir, "prefix_vs_load.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


def _write_csv(path: str, results) -> None:
    import csv
    rows = [r.row() for r in results]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sched_prefix", description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=None, help="a trace file or spec loadgen reads (default: the apps spec above)")
    p.add_argument("--model", default="small")
    p.add_argument("--colocated", type=int, default=2)
    p.add_argument("--prefill", type=int, default=0)
    p.add_argument("--decode", type=int, default=0)
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests/s (0: the trace's own)")
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--max-input-tokens", type=int, default=3072)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--num-blocks", type=int, default=DEFAULT_NUM_BLOCKS, help="KV blocks per instance (0: default)")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per Mooncake hash block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-pin-cores", action="store_true")
    p.add_argument("--out-dir", default=None, help="also write prefix_vs_load.json and per-request CSVs here")
    a = p.parse_args(argv)
    if (a.colocated == 0) == (a.prefill == 0):
        p.error("give --colocated N, or --prefill P --decode D (and --colocated 0)")
    print(json.dumps({"host": host_line()}), flush=True)
    res = prefix_vs_load(a.trace, model=a.model, colocated=a.colocated, prefill=a.prefill, decode=a.decode,
                         rate=a.rate or None, max_requests=a.max_requests, max_input_tokens=a.max_input_tokens,
                         max_output_tokens=a.max_output_tokens, num_blocks=a.num_blocks or None,
                         block_tokens=a.block_tokens, seed=a.seed, dtype=a.dtype, pin_cores=not a.no_pin_cores,
                         out_dir=a.out_dir)
    for policy in POLICIES:
        print(json.dumps({"policy": policy, **res[policy]}), flush=True)
    print(json.dumps({"prefix_vs_load_p90_ttft": res["prefix_vs_load_p90_ttft"],
                      "prefix_vs_load_p50_ttft": res["prefix_vs_load_p50_ttft"],
                      "load_p90_ttft": res["load"]["p90_ttft"], "prefix_p90_ttft": res["prefix"]["p90_ttft"],
                      "load_cached_token_fraction": res["load"]["cached_token_fraction"],
                      "prefix_cached_token_fraction": res["prefix"]["cached_token_fraction"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
