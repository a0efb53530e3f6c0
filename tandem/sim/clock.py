"""A virtual clock: callbacks run in (time, order of scheduling) order; time only moves between them.

    loop = EventLoop()
    loop.at(1.5, fn, arg)          # fn(arg) at t = 1.5 s
    h = loop.after(0.2, fn)        # h.cancel(): it will not run
    loop.run(until=3600.0)

Deterministic: equal times run in the order they were scheduled. No wall clock, no sleeps.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Timer:
    __slots__ = ("time", "fn", "args", "cancelled")

    def __init__(self, time: float, fn: Callable, args: tuple):
        self.time, self.fn, self.args, self.cancelled = time, fn, args, False

    def cancel(self) -> None:
        """Safe to call more than once, or after it ran."""
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.events_run = 0

    def at(self, time: float, fn: Callable, *args) -> Timer:
        """Run fn(*args) at `time` (a time in the past runs at once, i.e. at `now`)."""
        timer = Timer(max(time, self.now), fn, args)
        heapq.heappush(self._heap, (timer.time, next(self._seq), timer))
        return timer

    def after(self, delay: float, fn: Callable, *args) -> Timer:
        return self.at(self.now + delay, fn, *args)

    def run(self, until: float = float("inf"), stop: Callable[[], bool] | None = None) -> None:
        """Run events until none is left, the next is after `until`, or `stop()` is true."""
        heap = self._heap
        while heap:
            t, _, timer = heap[0]
            if t > until:
                break
            heapq.heappop(heap)
            if timer.cancelled:
                continue
            self.now = t
            self.events_run += 1
            timer.fn(*timer.args)
            if stop is not None and stop():
                break

    def __len__(self) -> int:
        return len(self._heap)
