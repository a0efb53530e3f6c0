"""Cluster benchmarks on `small` (bfloat16), printed as JSON lines:

1. `ttft_breakdown`: on a 1P+1D cluster (workers pinned to different cores), where time to first
   token goes, p50 over --repeats sequential requests per prompt length (--ttft-prompts, default
   16 and 512 tokens) on the idle cluster, then over Poisson arrivals at --load (0.8) of the
   cluster's capacity (512-token prompts, 16 output tokens; capacity = requests/s it completes
   when 16 arrive at once). The parts add up to the client's TTFT: router_queue (arrival →
   dispatched) + queue (prefill engine) + prefill + transfer (not overlapped with prefill) + path
   (the router's rest: RPCs, crossings) + client_network (client TTFT − router TTFT).
   `path_overhead_s` = client TTFT − prefill compute − non-overlapped transfer (goal ≤ 5 ms p50
   idle, ≤ 20 ms p50 at 80% load); `path_overhead_no_queue_s` also leaves out the prefill engine's
   queue (under load: waiting for the batch ahead, not the path).
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


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    except OSError:
        return "?"


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
    # All n at once is the point (offline throughput): no queue-wait bound refuses the tail of them.
    with LocalCluster(model, worker_args=worker_args(), router_args=["--max-queue-wait-s", "0"], **shape) as c:
        return asyncio.run(drive(c.address, prompts(n, i, vocab, 1), o))


TTFT_KEYS = ("client_ttft_s", "ttft_s", "router_queue_s", "queue_s", "prefill_s", "transfer_s", "path_s",
             "first_decode_s", "kv_bytes")


def ttft_row(r) -> dict:
    """One completion's TTFT, split so the parts add up to the client's TTFT:

    client_ttft = router_queue + P queue + prefill + transfer + router path + client network, where
    router path = router TTFT − the parts before it, client network = client TTFT − router TTFT.
    `path_overhead_s` = client TTFT − prefill compute − non-overlapped transfer (the issue's figure)."""
    b = {k: float(v) for k, v in (r.ttft_breakdown or {}).items() if isinstance(v, (int, float))}
    row = {"client_ttft_s": r.ttft_s, **b}
    row["path_overhead_s"] = r.ttft_s - b.get("prefill_s", 0.0) - b.get("transfer_s", 0.0)
    row["path_overhead_no_queue_s"] = row["path_overhead_s"] - b.get("queue_s", 0.0)
    if b.get("ttft_s"):
        row["client_network_s"] = r.ttft_s - b["ttft_s"]
    return row


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in (*TTFT_KEYS, "client_network_s", "path_overhead_s", "path_overhead_no_queue_s")
            if any(k in row for row in rows)]
    out = {f"{k}_p50": statistics.median(float(row.get(k, 0.0)) for row in rows) for k in keys}
    out["path_overhead_s_p90"] = statistics.quantiles([row["path_overhead_s"] for row in rows], n=10)[-1]
    out["n"] = len(rows)
    return out


async def loaded_rows(address: str, batch: list[list[int]], rate: float, max_tokens: int, seed: int) -> list[dict]:
    """Open-loop Poisson arrivals at `rate` requests/s; one row per completion."""
    rng = random.Random(seed)
    async with AsyncClient(address) as client:
        async def one(delay: float, p: list[int]):
            await asyncio.sleep(delay)
            return await client.complete(token_ids=p, max_tokens=max_tokens, ignore_eos=True)
        t, starts = 0.0, []
        for _ in batch:
            t += rng.expovariate(rate)
            starts.append(t)
        results = await asyncio.gather(*(one(s, p) for s, p in zip(starts, batch)))
    return [ttft_row(r) for r in results]


async def capacity_rps(address: str, batch: list[list[int]], max_tokens: int) -> float:
    """Requests per second the cluster completes when `batch` arrives at once."""
    async with AsyncClient(address) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client.complete(token_ids=p, max_tokens=max_tokens, ignore_eos=True) for p in batch))
        return len(batch) / (time.perf_counter() - t0)


def ttft_breakdown(model: str, lengths: list[int], repeats: int, vocab: int, load: float, load_len: int,
                   load_requests: int) -> list[dict]:
    """Idle pinned 1P+1D: `repeats` sequential requests per prompt length (after two warm-ups);
    then, unless load is 0, Poisson arrivals at `load` × the cluster's capacity for load_len-token prompts."""
    out = []
    with LocalCluster(model, prefill=1, decode=1, pin_cores=True, worker_args=worker_args()) as c:
        with Client(c.address) as client:
            for n, length in enumerate(lengths):
                rows = []
                for k, p in enumerate(prompts(repeats + 2, length, vocab, 7 + n)):
                    r = client.complete(token_ids=p, max_tokens=4, ignore_eos=True)
                    if k >= 2:                                       # two warm-ups
                        rows.append(ttft_row(r))
                out.append({"bench": "ttft_breakdown", "cluster": "1P+1D pinned", "load": "idle",
                            "prompt_tokens": length, **summarize(rows)})
        if load:
            cap = asyncio.run(capacity_rps(c.address, prompts(16, load_len, vocab, 50), 16))
            rows = asyncio.run(loaded_rows(c.address, prompts(load_requests, load_len, vocab, 51), load * cap, 16, 3))
            out.append({"bench": "ttft_breakdown", "cluster": "1P+1D pinned", "load": f"{load:.0%} of capacity",
                        "capacity_rps": round(cap, 3), "rate_rps": round(load * cap, 3), "prompt_tokens": load_len,
                        "max_tokens": 16, **summarize(rows)})
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-engine-child":
        model, n, i, o, core = sys.argv[2], *map(int, sys.argv[3:7])
        raw_engine_child(model, n, i, o, core)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--workload", default="128x128x128", help="NxIxO")
    ap.add_argument("--ttft-prompts", default="16,512", help="prompt lengths of the idle TTFT breakdown")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--load", type=float, default=0.8, help="loaded TTFT run at this share of capacity (0: skip)")
    ap.add_argument("--load-prompt", type=int, default=512)
    ap.add_argument("--load-requests", type=int, default=60)
    ap.add_argument("--ttft-only", action="store_true", help="only the TTFT breakdown")
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

    print(json.dumps({"bench": "host", "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0))}), flush=True)
    headline = {"bench": "cluster", "path_overhead_ms_p50": {}}
    for line in ttft_breakdown(model, [int(x) for x in a.ttft_prompts.split(",")], a.repeats, vocab, a.load,
                               a.load_prompt, a.load_requests):
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in line.items()}), flush=True)
        key = f"{line['prompt_tokens']}_tokens" + ("" if line["load"] == "idle" else f"_at_{a.load:.0%}_load")
        headline["path_overhead_ms_p50"][key] = round(line["path_overhead_s_p50"] * 1e3, 2)
    if a.ttft_only:
        print(json.dumps(headline), flush=True)
        return 0

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
    headline["colocated_vs_raw_engine"] = round(ratio, 3)
    print(json.dumps(headline), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
