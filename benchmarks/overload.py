"""`make bench-overload`: goodput before, during and after a 10x burst (issue 18, item 4).

A tiny 1P+1D LocalCluster serves STEADY closed-loop clients (64 -> 64 tokens, ignore_eos) through
one AsyncClient. After WARMUP_S the steady goodput (tokens/s streamed to the steady clients, over
a sliding window) is measured; then a burst of requests arrives open-loop at BURST_X times the
measured request rate for BURST_S seconds, each started at once through the same AsyncClient (the
issue's "2,000 requests started at once"); then the script watches the steady goodput until it
is back to >= 90% of its pre-burst value.

Every request must end served or with a status that says why (RESOURCE_EXHAUSTED with a
retry-after, UNAVAILABLE, both with a message); anything else counts in `unexplained`. A steady
client refused with a retry-after waits that long, as a well-behaved client would. The router's
RSS is sampled throughout (/proc), and the workers are checked for leaks at the end.

    python benchmarks/overload.py [--steady 4] [--burst-x 10] [--burst-s 3] [--max-queued N] [--max-queue-wait-s S]

The host line comes first; the last line printed is one JSON object: {"goodput_before_tok_s",
"goodput_during_tok_s", "goodput_after_tok_s", "time_to_recover_s", "burst_requests",
"burst_served", "burst_refused", "unexplained", "router_rss_before_mib", "peak_router_rss_mib",
"leaked"}.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host_info import host_line  # noqa: E402
from tandem import AsyncClient  # noqa: E402
from tandem.errors import ResourceExhaustedError, TandemError, UnavailableError  # noqa: E402
from tandem.local_cluster import LocalCluster  # noqa: E402

PROMPT_TOKENS = OUTPUT_TOKENS = 64
RECOVERED = 0.9             # goodput back to this share of its pre-burst value


@dataclass
class Outcomes:
    """How requests ended: "ok", or the status name; `unexplained` lists what said nothing useful."""
    counts: collections.Counter = field(default_factory=collections.Counter)
    unexplained: list = field(default_factory=list)
    retry_after: list = field(default_factory=list)
    first_detail: dict = field(default_factory=dict)     # outcome → the message of its first request

    def add(self, outcome: str, detail: str = "", retry_after_s: float | None = None) -> None:
        self.counts[outcome] += 1
        self.first_detail.setdefault(outcome, detail)
        if outcome == "RESOURCE_EXHAUSTED":
            self.retry_after.append(retry_after_s)
        if outcome != "ok" and (outcome not in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") or not detail.strip()):
            self.unexplained.append(f"{outcome}: {detail!r}")


def prompt(i: int) -> list[int]:
    return [(i * 7 + k) % 200 + 1 for k in range(PROMPT_TOKENS)]


async def one(client: AsyncClient, i: int, outcomes: Outcomes, on_tokens=None, timeout: float = 300.0) -> float:
    """Run request i; record how it ended; return the server's retry-after (0 when none)."""
    try:
        got = 0
        async for chunk in client.generate(token_ids=prompt(i), max_tokens=OUTPUT_TOKENS, ignore_eos=True,
                                           timeout=timeout):
            got += len(chunk.token_ids)
            if on_tokens is not None:
                on_tokens(len(chunk.token_ids))
        outcomes.add("ok" if got == OUTPUT_TOKENS else f"short({got})")
    except ResourceExhaustedError as e:
        outcomes.add("RESOURCE_EXHAUSTED", e.details, e.retry_after_s)
        return e.retry_after_s or 1.0
    except UnavailableError as e:
        outcomes.add("UNAVAILABLE", e.details)
        return 1.0
    except TandemError as e:
        outcomes.add(e.code.name, e.details)
    return 0.0


async def burst(client: AsyncClient, n: int, start: int = 0) -> Outcomes:
    """n requests started at once through `client`; every one awaited."""
    outcomes = Outcomes()
    await asyncio.gather(*(one(client, start + i, outcomes) for i in range(n)))
    return outcomes


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Goodput:
    """Tokens streamed to the steady clients, as (time, tokens) events; rate over a trailing window."""

    def __init__(self):
        self.events: collections.deque = collections.deque()
        self.requests_done = 0

    def add(self, tokens: int) -> None:
        self.events.append((time.monotonic(), tokens))

    def rate(self, window_s: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return sum(t for at, t in self.events if now - window_s <= at <= now) / window_s


async def run(address: str, router_pid: int, a: argparse.Namespace) -> dict:
    goodput, steady_out = Goodput(), Outcomes()
    stop = asyncio.Event()
    rss = [rss_mib(router_pid)]

    async with AsyncClient(address, max_retries=0) as client:
        async def steady(k: int) -> None:
            i = 1_000_000 * (k + 1)
            while not stop.is_set():
                wait = await one(client, i, steady_out, goodput.add)
                goodput.requests_done += wait == 0
                i += 1
                if wait:
                    await asyncio.sleep(wait)

        async def sample_rss() -> None:
            while not stop.is_set():
                rss.append(rss_mib(router_pid))
                await asyncio.sleep(0.1)

        tasks = [asyncio.create_task(steady(k)) for k in range(a.steady)] + [asyncio.create_task(sample_rss())]
        await asyncio.sleep(a.warmup_s)
        t0, done0 = time.monotonic(), goodput.requests_done
        await asyncio.sleep(a.measure_s)
        before = goodput.rate(a.measure_s)
        req_rate = (goodput.requests_done - done0) / (time.monotonic() - t0)
        rss_before = max(rss)
        per_tick = max(1, round(req_rate * a.burst_x * 0.1))       # arrivals every 0.1 s at burst_x the rate
        burst_out, waves, started = Outcomes(), [], time.monotonic()
        while time.monotonic() - started < a.burst_s:
            waves.append(asyncio.create_task(_wave(client, per_tick, len(waves) * per_tick, burst_out)))
            await asyncio.sleep(0.1)
        burst_end = time.monotonic()
        during = goodput.rate(burst_end - started)
        recovered_at = None
        while time.monotonic() - burst_end < a.max_recover_s:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            if now - burst_end >= a.window_s and goodput.rate(a.window_s, now) >= RECOVERED * before:
                recovered_at = now - a.window_s      # the window that reached it started here
                break
        after = goodput.rate(a.window_s)
        await asyncio.gather(*waves)
        stop.set()
        await asyncio.gather(*tasks)
    unexplained = steady_out.unexplained + burst_out.unexplained
    return {"goodput_before_tok_s": round(before, 1), "goodput_during_tok_s": round(during, 1),
            "goodput_after_tok_s": round(after, 1),
            "time_to_recover_s": None if recovered_at is None else round(max(0.0, recovered_at - burst_end), 2),
            "steady_clients": a.steady, "burst_x": a.burst_x, "burst_s": a.burst_s,
            "burst_requests": sum(burst_out.counts.values()), "burst_served": burst_out.counts["ok"],
            "burst_refused": burst_out.counts["RESOURCE_EXHAUSTED"],
            "burst_unavailable": burst_out.counts["UNAVAILABLE"],
            "steady_refused": steady_out.counts["RESOURCE_EXHAUSTED"],
            "unexplained": len(unexplained), "unexplained_examples": unexplained[:3],
            "router_rss_before_mib": round(rss_before, 1), "peak_router_rss_mib": round(max(rss), 1)}


async def _wave(client: AsyncClient, n: int, start: int, into: Outcomes) -> None:
    got = await burst(client, n, start)
    into.counts.update(got.counts)
    into.unexplained += got.unexplained
    into.retry_after += got.retry_after


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steady", type=int, default=4, help="closed-loop clients before, during and after the burst")
    p.add_argument("--burst-x", type=float, default=10.0, help="burst arrival rate / the measured request rate")
    p.add_argument("--burst-s", type=float, default=3.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--measure-s", type=float, default=8.0)
    p.add_argument("--window-s", type=float, default=2.0, help="goodput window after the burst")
    p.add_argument("--max-recover-s", type=float, default=120.0)
    p.add_argument("--max-queued", type=int, default=None, help="the router's --max-queued-requests (default: its own)")
    p.add_argument("--max-queue-wait-s", type=float, default=None,
                   help="the router's --max-queue-wait-s (default: its own; 0: no bound)")
    a = p.parse_args(argv)
    print(json.dumps({"host": host_line()}), flush=True)
    router_args = [] if a.max_queued is None else ["--max-queued-requests", str(a.max_queued)]
    if a.max_queue_wait_s is not None:
        router_args += ["--max-queue-wait-s", str(a.max_queue_wait_s)]
    print(json.dumps({"router_args": router_args}), flush=True)
    with LocalCluster("tiny", prefill=1, decode=1, router_args=router_args) as cluster:
        result = asyncio.run(run(cluster.address, cluster.procs["router"].pid, a))
        from tests.integration.cluster_helpers import assert_no_leaks
        try:
            assert_no_leaks(cluster.address)
            result["leaked"] = 0
        except AssertionError as e:
            result["leaked"], result["leak"] = 1, str(e)[:300]
    print(json.dumps(result), flush=True)
    return 0 if result["unexplained"] == 0 and result["leaked"] == 0 and result["time_to_recover_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
