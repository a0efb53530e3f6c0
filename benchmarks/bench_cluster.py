"""Cluster benchmarks on `small` (bfloat16), printed as JSON lines:

1. `ttft_breakdown`: one request on a 1P+1D cluster (workers pinned to different cores): where its
   time to first token went (queue, prefill, transfer, first decode step), median of --repeats.
2. `saturation`: N requests of I prompt tokens → O output tokens, all sent at once through the
   SDK, beside the raw engine of the same instance configuration in the same run:
   - raw engine: LLMEngine.generate in a process pinned to one core (one torch thread);
   - colocated cluster, one instance pinned to that core (router and client on the other core):
     the cost of the serving path (gRPC, router, streaming) — goal ≥ 85% of the raw engine;
   - 1P+1D cluster (prefill on one core, decode on the other), reported beside the same raw figure.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tandem import AsyncClient, Client  # noqa: E402
from tandem.local_cluster import LocalCluster  # noqa: E402

ENGINE_ARGS = {"dtype": "bfloat16", "max_num_batched_tokens": 2048, "max_num_seqs": 256, "kv_memory_gib": 1.0}


def worker_args() -> list[str]:
    return [x for k, v in ENGINE_ARGS.items() for x in ("--" + k.replace("_", "-"), str(v))]


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 1) for _ in range(length)] for _ in range(n)]


# ---- raw engine (child process) ---------------------------------------------------------------
def raw_engine_child(model: str, n: int, i: int, o: int, core: int) -> None:
    os.sched_setaffinity(0, {core})
    from services.engine.builder import build_engine
    from services.engine.sampling_params import SamplingParams

    engine = build_engine(model, num_threads=1, **ENGINE_ARGS)
    vocab = engine.config.model.vocab_size
    engine.generate(prompts(4, 64, vocab, 99), SamplingParams(max_tokens=8, ignore_eos=True))   # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(prompts(n, i, vocab, 1), SamplingParams(max_tokens=o, ignore_eos=True))
    dt = time.perf_counter() - t0
    n_out = sum(len(x.token_ids) for x in outs)
    print(json.dumps({"wall_s": dt, "output_tokens": n_out, "output_tokens_per_s": n_out / dt}))


def raw_engine(model: str, n: int, i: int, o: int, core: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--raw-engine-child", model, str(n), str(i), str(o), str(core)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- cluster ------------------------------------------------------------------------------------
async def drive(address: str, batch: list[list[int]], max_tokens: int) -> dict:
    async with AsyncClient(address) as client:
        await client.complete(token_ids=batch[0][:64], max_tokens=8, ignore_eos=True)      # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client.complete(token_ids=p, max_tokens=max_tokens, ignore_eos=True)
                                         for p in batch))
        dt = time.perf_counter() - t0
    n_out = sum(len(r.token_ids) for r in results)
    return {"wall_s": dt, "output_tokens": n_out, "output_tokens_per_s": n_out / dt,
            "ttft_p50_s": statistics.median(r.ttft_s for r in results),
            "tpot_p50_s": statistics.median(r.tpot_s for r in results)}


def cluster_throughput(model: str, shape: dict, n: int, i: int, o: int, vocab: int) -> dict:
    with LocalCluster(model, worker_args=worker_args(), **shape) as c:
        return asyncio.run(drive(c.address, prompts(n, i, vocab, 1), o))


def ttft_breakdown(model: str, prompt_len: int, repeats: int, vocab: int) -> dict:
    rows = []
    with LocalCluster(model, prefill=1, decode=1, pin_cores=True, worker_args=worker_args()) as c:
        with Client(c.address) as client:
            for k, p in enumerate(prompts(repeats + 2, prompt_len, vocab, 7)):
                r = client.complete(token_ids=p, max_tokens=4, ignore_eos=True)
                if k >= 2:                                       # two warm-ups
                    rows.append({"client_ttft_s": r.ttft_s, **r.ttft_breakdown})
    keys = ["client_ttft_s", "queue_s", "prefill_s", "transfer_s", "first_decode_s", "kv_bytes"]
    return {k: statistics.median(float(row.get(k, 0.0)) for row in rows) for k in keys}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-engine-child":
        model, n, i, o, core = sys.argv[2], *map(int, sys.argv[3:7])
        raw_engine_child(model, n, i, o, core)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--workload", default="128x128x128", help="NxIxO")
    ap.add_argument("--ttft-prompt", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-pd", action="store_true")
    a = ap.parse_args()
    from services.engine.loader import resolve_model
    vocab = resolve_model(a.model, weights=False).config.vocab_size
    model = a.model
    if model in ("tiny", "small") and not os.path.isdir(model):       # generate the weights once, share the directory
        from services.engine.builder import load_tokenizer
        from services.engine.loader import export_model
        loaded = resolve_model(model)
        model = os.path.join(tempfile.mkdtemp(prefix="tandem-bench-"), a.model)
        export_model(loaded, model, load_tokenizer(loaded))

    tb = ttft_breakdown(model, a.ttft_prompt, a.repeats, vocab)
    print(json.dumps({"bench": "ttft_breakdown", "cluster": "1P+1D pinned", "prompt_tokens": a.ttft_prompt, **tb}),
          flush=True)

    n, i, o = map(int, a.workload.split("x"))
    core = min(os.sched_getaffinity(0))           # where LocalCluster pins a single colocated instance
    raw = raw_engine(model, n, i, o, core)
    print(json.dumps({"bench": "saturation", "system": "raw_engine", "workload": a.workload, "core": core,
                      **raw}), flush=True)
    colo = cluster_throughput(model, {"prefill": 0, "decode": 0, "colocated": 1, "pin_cores": True}, n, i, o, vocab)
    ratio = colo["output_tokens_per_s"] / raw["output_tokens_per_s"]
    print(json.dumps({"bench": "saturation", "system": "cluster_colocated_1", "workload": a.workload, **colo,
                      "ratio_vs_raw_engine": round(ratio, 3), "goal": 0.85, "meets_goal": ratio >= 0.85}), flush=True)
    if not a.skip_pd:
        pd = cluster_throughput(model, {"prefill": 1, "decode": 1, "pin_cores": True}, n, i, o, vocab)
        print(json.dumps({"bench": "saturation", "system": "cluster_1p1d", "workload": a.workload, **pd,
                          "ratio_vs_raw_engine": round(pd["output_tokens_per_s"] / raw["output_tokens_per_s"], 3)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
