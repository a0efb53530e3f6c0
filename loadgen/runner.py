"""The open-loop runner: every request is sent at its scheduled offset, whatever earlier ones do.

A dispatcher sleeps until each request's offset and starts it as its own task; it never waits
for responses, so a slow target cannot delay later sends. A concurrency cap (`max_concurrency`)
is applied only when asked: then a request waits for a free slot, and that wait counts as
latency (metrics count from the scheduled time).

`stop(results, now)`, when given, is asked about twice a second; once it returns True the run
ends: nothing more is sent, requests in flight are cancelled (the target's stream is closed, which
aborts them on the server) and every unfinished request ends with the error `STOPPED`.

A target whose `stream` takes an `info` argument gets each request's `RequestResult.info` dict to
fill with what the server reports about it (a Tandem router's TTFT breakdown and instances).
"""
from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections.abc import Callable

from loadgen.metrics import RequestResult, stats
from loadgen.targets import Target, TargetError
from loadgen.workloads import RequestSpec, Workload

STOPPED = "not finished: the run was stopped early"
STOP_CHECK_S = 0.5


def takes_info(target: Target) -> bool:
    """Whether `target.stream` accepts an `info` dict to fill."""
    try:
        return "info" in inspect.signature(target.stream).parameters
    except (TypeError, ValueError):
        return False


async def stream_into(target: Target, prompt: list[int], max_tokens: int, res: RequestResult, clock,
                      with_info: bool) -> None:
    """Send one request, appending (arrival time, tokens) to `res.events`."""
    stream = target.stream(prompt, max_tokens, info=res.info) if with_info else target.stream(prompt, max_tokens)
    async for n in stream:
        res.events.append((clock(), n))


async def run(workload: Workload, target: Target, *, max_concurrency: int | None = None,
              progress: bool = True, out=sys.stderr,
              stop: Callable[[list[RequestResult], float], bool] | None = None) -> tuple[list[RequestResult], float]:
    """(results in workload order, wall seconds). `target` must already be entered."""
    loop = asyncio.get_running_loop()
    with_info = takes_info(target)
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
                await stream_into(target, prompt, spec.output_tokens, res, clock, with_info)
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
    watcher = asyncio.create_task(_watch(stop, results, clock)) if stop is not None else None
    stopped = False

    async def dispatch() -> None:
        for spec, res in zip(workload.requests, results):
            delay = spec.arrival_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec, res)))
        await asyncio.gather(*tasks)

    sender = asyncio.create_task(dispatch())
    try:
        if watcher is None:
            await sender
        else:
            await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                sender.result()
            else:
                watcher.result()            # re-raises what `stop` raised
                stopped = True
    finally:
        for t in (sender, watcher, *tasks):
            if t is not None:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)   # each cancelled stream closes its call
        if stopped:
            now = clock()
            for res in results:
                if res.end_s is None:
                    res.error, res.end_s = STOPPED, now
        if reporter is not None:
            reporter.cancel()
            out.write("\r" + _line(results, clock()) + "\n")
            out.flush()
    return results, clock()


async def _watch(stop, results, clock) -> None:
    """Returns once `stop` says so."""
    while not stop(results, clock()):
        await asyncio.sleep(STOP_CHECK_S)


async def run_sequential(workload: Workload, target: Target) -> list[RequestResult]:
    """Each request of `workload` sent once the previous one has finished, its latencies counted
    from its own send (unloaded latencies). A failed request is recorded and the next one sent."""
    loop = asyncio.get_running_loop()
    with_info = takes_info(target)
    results = []
    for spec in workload.requests:
        t0 = loop.time()
        clock = lambda: loop.time() - t0          # noqa: E731
        res = RequestResult(spec.index, 0.0, sent_s=0.0, input_tokens=spec.input_tokens, max_tokens=spec.output_tokens)
        try:
            await stream_into(target, workload.prompt(spec), spec.output_tokens, res, clock, with_info)
        except TargetError as e:
            res.error = str(e) or type(e).__name__
        res.end_s = clock()
        results.append(res)
    return results


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
