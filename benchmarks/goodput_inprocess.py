"""Scratch diagnostic (issue 15): the same trace slice and rate `make bench-goodput` probes, replayed
in real time through ONE engine in this process: no router, no gRPC, no client, nothing else on the
cores. Set beside a probe of the `single` system, the difference is what serving costs on top of
the engine.

    python benchmarks/goodput_inprocess.py --rate 2.0 --ttft 0.24 --tpot 0.027
    python benchmarks/goodput_inprocess.py --rate 2.0 --noise 0.15,0.2   # + a process busy 15% in 0.2 ms bursts
    python benchmarks/goodput_inprocess.py --rate 2.0 --noise 0.15,0.2 --noise-nice 19
    python benchmarks/goodput_inprocess.py --rate 3.48 --gil-noise 0.13,0.5   # + a busy thread in this process

Prints one JSON line: attainment (share meeting both SLOs), misses by kind, TTFT and TPOT p90, and
the median decode-only step time and the number of such steps by batch size. `--start S` replays only the requests that arrive
from S seconds on (the burst of the Azure conversation slice at 2 req/s starts near 55 s).

Measured 2026-12-06 (AMD EPYC Zen 4, 2 cores, AVX-512 bf16, torch 2.13.0+cpu, `small` bf16, the
Azure conversation slice at 2 req/s, SLOs TTFT <= 0.24 s / TPOT <= 27 ms, one run each):
- in process, 120 requests: 95% meet both (5 TTFT misses, 1 TPOT), TPOT p90 17-20 ms;
- the `single` system (router + worker + this project's client, same engine settings) on the
  same slice: 79-83% over 7 runs, TPOT p90 27-37 ms; vLLM's CPU server in the same probe: 85%;
- the burst alone (--start 50, 39 requests): 85% in process; with a process busy 15% of the time in
  0.2 ms bursts 54-69%, TPOT p90 25-31 ms; the same process at nice 19: 85-87%, 18 ms.
- decode-only step medians in the worker during the `single` probe against in process:
  batch 11-16 19.8 vs 13.0 ms, 17-22 24.5 vs 15.7 ms: the engine's 2-thread steps run ~1.5x
  slower beside the serving path's ~0.2 cores of work (router 0.09, client 0.05, worker's
  asyncio thread 0.06 at 3 req/s).

Measured 2026-12-06 on an Intel Xeon with AMX (2 cores, AVX-512 bf16 + AMX, same model and slice,
SLOs of that run's vLLM reference: TTFT <= 0.119 s / TPOT <= 27.4 ms, one run each, 3.48 req/s):
- in process: TPOT p90 30-35 ms; decode-only steps at batch 23-64: 24.6-26.6 ms (156-229 of them);
- `single` (router + worker + client): 42-46% over 6 runs, TPOT p90 67-70 ms, batch 23-64 steps
  43-44 ms (the worker's own step log); vLLM at 3.92 req/s in its goodput run: TPOT p90 48 ms;
- in process beside a process busy 12% of the time in 0.2 ms bursts: 44%, TPOT p90 71 ms, batch
  23-64 steps 39.8 ms: the serving path's ~0.12 cores on the engine's two cores, not its code,
  reproduce the whole gap; a thread of this process holding the GIL 13% of the time in 0.5 ms
  bursts: 46%, TPOT p90 54 ms, 35.8 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

# the busy loop (_busy) in a process of its own: argv duty, burst in ms
NOISE = (f"import sys; sys.path.insert(0, {os.path.dirname(HERE)!r}); "
         "from benchmarks.goodput_inprocess import _busy; _busy(float(sys.argv[1]), float(sys.argv[2]) / 1000)")


def _busy(duty: float, burst: float) -> None:
    """Busy `duty` of the time in bursts of `burst` s (pure Python: on a thread of this process it holds
    the GIL while busy; NOISE runs it in a process of its own)."""
    import random
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < burst:
            pass
        time.sleep(burst * (1 - duty) / duty * random.uniform(0.5, 1.5))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--probe-s", type=float, default=60.0, help="requests = rate x this, as bench-goodput sizes a probe")
    p.add_argument("--start", type=float, default=0.0, help="replay only requests arriving from here on (s)")
    p.add_argument("--ttft", type=float, default=0.24)
    p.add_argument("--tpot", type=float, default=0.027)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--noise", default="", metavar="DUTY,BURST_MS", help="run a busy process beside the engine")
    p.add_argument("--noise-nice", type=int, default=0)
    p.add_argument("--gil-noise", default="", metavar="DUTY,BURST_MS",
                   help="run the same busy loop on a thread of THIS process, so it holds the engine's GIL")
    a = p.parse_args()

    from loadgen import bench_goodput as bg
    from loadgen.workloads import build_workload
    from services.engine.builder import build_engine
    from services.engine.sampling_params import SamplingParams

    args = bg._parser().parse_args([])
    engine = build_engine("small", dtype=a.dtype, num_threads=a.threads, kv_memory_gib=1.0,
                          max_num_batched_tokens=a.max_num_batched_tokens)
    n = max(20, round(a.rate * a.probe_s))
    workload = build_workload(bg._config(args, 32000, max_requests=n, rate=a.rate, salt=1 + round(a.rate * 1000)))
    todo = [r for r in workload.requests if r.arrival_s >= a.start]
    if not todo:
        last = workload.requests[-1].arrival_s if workload.requests else 0.0
        sys.exit(f"goodput_inprocess: --start {a.start:g}: no request arrives from then on (the last arrives at "
                 f"{last:.1f} s at --rate {a.rate:g}); give a smaller --start")
    rng = np.random.default_rng(0)
    engine.generate([[int(x) for x in rng.integers(0, 32000, 400)]],
                    SamplingParams(max_tokens=8, ignore_eos=True))          # warm-up
    noise = None
    if a.noise:
        duty, burst = a.noise.split(",")
        noise = subprocess.Popen(["nice", "-n", str(a.noise_nice), sys.executable, "-c", NOISE, duty, burst])
    if a.gil_noise:
        duty, burst = (float(x) for x in a.gil_noise.split(","))
        threading.Thread(target=_busy, args=(duty, burst / 1000), daemon=True).start()
    events: dict[str, tuple[float, list[float]]] = {}
    steps = []
    try:
        t0 = time.monotonic() - (todo[0].arrival_s if todo else 0.0)
        while todo or engine.has_unfinished():
            now = time.monotonic() - t0
            while todo and todo[0].arrival_s <= now:
                r = todo.pop(0)
                rid = engine.add_request([int(x) for x in rng.integers(0, 32000, r.input_tokens)],
                                         SamplingParams(max_tokens=r.output_tokens, ignore_eos=True))
                events[rid] = (r.arrival_s, [])
            if not engine.has_unfinished():
                time.sleep(max(0.0, min(0.005, todo[0].arrival_s - now)))
                continue
            began = time.monotonic()
            outputs = engine.step()
            done = time.monotonic()
            steps.append((engine.last_step_decodes, engine.last_step_prefill_tokens, done - began))
            for o in outputs:
                events[o.request_id][1].append(done - t0)
    finally:
        if noise is not None:
            noise.kill()
            noise.wait()
    ttft = np.array([ts[0] - arrival for arrival, ts in events.values()])
    tpot = np.array([(ts[-1] - ts[0]) / max(len(ts) - 1, 1) for _, ts in events.values()])
    miss_t, miss_p = ttft > a.ttft, tpot > a.tpot
    st = np.array(steps)
    by_batch, counts = {}, {}
    for lo, hi in ((1, 4), (5, 10), (11, 16), (17, 22), (23, 64)):
        sel = (st[:, 1] == 0) & (st[:, 0] >= lo) & (st[:, 0] <= hi)
        if sel.any():
            by_batch[f"{lo}-{hi}"] = round(float(np.median(st[sel, 2])) * 1e3, 2)
            counts[f"{lo}-{hi}"] = int(sel.sum())
    from benchmarks.host_info import host_line
    print(json.dumps({"host": host_line(), "rate": a.rate, "requests": len(events), "noise": a.noise or None,
                      "noise_nice": a.noise_nice, "gil_noise": a.gil_noise or None, "attainment": round(float(np.mean(~miss_t & ~miss_p)), 3),
                      "miss_ttft": int(miss_t.sum()), "miss_tpot": int(miss_p.sum()),
                      "ttft_p90_s": round(float(np.percentile(ttft, 90)), 3),
                      "tpot_p90_ms": round(float(np.percentile(tpot, 90)) * 1e3, 1),
                      "decode_step_ms_by_batch": by_batch, "decode_steps_by_batch": counts,
                      "steps": len(steps), "prefill_steps": int((st[:, 1] > 0).sum())}))


if __name__ == "__main__":
    from services.allocator import use_tcmalloc
    use_tcmalloc()          # the allocator a worker runs (vLLM's CPU build runs under tcmalloc too)
    main()
