"""How closely the open-loop runner keeps to its schedule, as JSON.

An instant in-process target (first token after --service-s, no network) is driven at --rate
requests/s for --requests requests. Reported: send lag (actual send − scheduled time) mean, p50,
p99 and max, and the run's wall time beside the schedule's span plus one service time (what a
perfect open-loop sender would take). A closed-loop sender would take requests × service time.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loadgen.runner import run  # noqa: E402
from loadgen.workloads import WorkloadConfig, build_workload  # noqa: E402


class SlowInstantTarget:
    """Answers every request with `tokens` tokens after `service_s`; records send times."""
    url = "bench:instant"

    def __init__(self, service_s: float):
        self.service_s, self.sends = service_s, []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def vocab_size(self):
        return 1000

    def describe(self) -> dict:
        return {"kind": "in-process", "service_s": self.service_s}

    async def stream(self, prompt, max_tokens):
        self.sends.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.service_s)
        for _ in range(max_tokens):
            yield 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--service-s", type=float, default=1.0)
    a = ap.parse_args()
    wl = build_workload(WorkloadConfig(trace=f"synthetic:n={a.requests},input=8,output=2", arrival="constant",
                                       rate=a.rate, vocab_size=1000))
    target = SlowInstantTarget(a.service_s)

    async def go():
        t0 = asyncio.get_running_loop().time()
        _, wall = await run(wl, target, progress=False, out=io.StringIO())
        return wall, [t - t0 for t in target.sends]

    wall, sends = asyncio.run(go())
    lags = sorted(s - r.arrival_s for s, r in zip(sorted(sends), wl.requests))
    ideal = wl.requests[-1].arrival_s + a.service_s
    print(json.dumps({
        "bench": "loadgen_schedule", "requests": a.requests, "rate_rps": a.rate, "service_s": a.service_s,
        "send_lag_s": {"mean": statistics.fmean(lags), "p50": lags[len(lags) // 2],
                       "p99": lags[int(0.99 * (len(lags) - 1))], "max": lags[-1]},
        "wall_s": wall, "ideal_open_loop_wall_s": ideal, "wall_vs_ideal": wall / ideal,
        "closed_loop_wall_s": a.requests * a.service_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
