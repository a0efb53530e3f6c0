"""The open-loop runner: every request is sent at its scheduled offset, whatever earlier ones do.

A dispatcher sleeps until each request's offset and starts it as its own task; it never waits
for responses, so a slow target cannot delay later sends. A concurrency cap (`max_concurrency`)
is applied only when asked: then a request waits for a free slot, and that wait counts as
latency (metrics count from the scheduled time).
"""
from __future__ import annotations

import asyncio
import sys
import time

from loadgen.metrics import RequestResult, stats
from loadgen.targets import Target, TargetError
from loadgen.workloads import RequestSpec, Workload


async def run(workload: Workload, target: Target, *, max_concurrency: int | None = None,
              progress: bool = True, out=sys.stderr) -> tuple[list[RequestResult], float]:
    """(results in workload order, wall seconds). `target` must already be entered."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    clock = lambda: loop.time() - t0          # noqa: E731
    results = [RequestResult(s.index, s.arrival_s, input_tokens=s.input_tokens, max_tokens=s.output_tokens)
               for s in workload.requests]
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(spec: RequestSpec, res: RequestResult) -> None:
        prompt = workload.prompt(spec)
        try:
            if slots is not None:
                await slots.acquire()
            try:
                res.sent_s = clock()
                async for n in target.stream(prompt, spec.output_tokens):
                    res.events.append((clock(), n))
            finally:
                if slots is not None:
                    slots.release()
            res.end_s = clock()
        except TargetError as e:
            res.error, res.end_s = str(e) or type(e).__name__, clock()
        except Exception as e:          # a target bug still counts as one failure, the run goes on
            res.error, res.end_s = f"{type(e).__name__}: {e}".splitlines()[0], clock()

    tasks: list[asyncio.Task] = []
    reporter = asyncio.create_task(_progress(results, clock, out)) if progress else None
    try:
        for spec, res in zip(workload.requests, results):
            delay = spec.arrival_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec, res)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        if reporter is not None:
            reporter.cancel()
            out.write("\r" + _line(results, clock()) + "\n")
            out.flush()
    return results, clock()


def _line(results: list[RequestResult], now: float) -> str:
    n = len(results)
    sent = sum(r.sent_s is not None for r in results)
    done = [r for r in results if r.end_s is not None]
    failed = sum(not r.ok for r in done)
    ok = [r for r in done if r.ok]
    tokens = sum(r.output_tokens for r in results)
    width = 24
    filled = int(width * len(done) / n) if n else width
    ttft, tpot = stats(r.ttft_s for r in ok), stats(r.tpot_s for r in ok)
    fmt = lambda s: "-" if s is None else f"{s['p50'] * 1000:.0f}/{s['p99'] * 1000:.0f}ms"   # noqa: E731
    return (f"[{'#' * filled}{'.' * (width - filled)}] {len(done)}/{n} sent {sent} inflight {sent - len(done)} "
            f"failed {failed} | ttft p50/p99 {fmt(ttft)} tpot {fmt(tpot)} | {tokens / max(now, 1e-9):.0f} tok/s "
            f"| {now:.1f}s")


async def _progress(results, clock, out) -> None:
    """Redraws one line twice a second on a terminal; elsewhere (CI logs) prints a line every 10 s."""
    tty = getattr(out, "isatty", lambda: False)()
    while True:
        out.write("\r" + _line(results, clock()) if tty else _line(results, clock()) + "\n")
        out.flush()
        await asyncio.sleep(0.5 if tty else 10.0)


def run_sync(workload: Workload, target: Target, **kwargs) -> tuple[list[RequestResult], float]:
    """`run` in a fresh event loop, entering and leaving `target` around it."""
    async def main():
        async with target:
            return await run(workload, target, **kwargs)
    started = time.perf_counter()
    results, wall = asyncio.run(main())
    return results, wall if wall > 0 else time.perf_counter() - started
