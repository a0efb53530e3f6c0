"""SLO-aware admission (`--admission none|slo`): refuse at once what cannot meet its TTFT SLO.

The router predicts a new request's TTFT as

    wait + prompt_tokens / prefill_rate
    wait = (requests ahead of it that have no first token yet) / start_rate

where "ahead" follows the queue policy (fcfs: every earlier one not started; sjf: those ordered
before it), `start_rate` is the measured rate at which requests got their first token while
others were waiting (StartRate: the gaps between first tokens with a backlog behind them, so idle
time does not count), and `prefill_rate` the fastest measured prefill rate among serving instances.
With no backlog measured yet the wait is 0: nothing is refused without evidence.

A request whose prediction exceeds its SLO (its own `slo.ttft_s`, else the cluster's
`--slo-ttft-s`) is refused with RESOURCE_EXHAUSTED / HTTP 429 and a retry-after of the excess
(rounded up to a whole second): by then the backlog ahead of it should have shrunk by that much.
An SLO below the prompt's own prefill time on an idle instance (measured rate) can never be met:
INVALID_ARGUMENT naming `slo.ttft_s` and the least value that could be.
"""
from __future__ import annotations

import collections
import math

ADMISSION_MODES = ("none", "slo")
DEFAULT_ADMISSION = "none"
# Admitted requests without a first token a router holds before it refuses more (any admission
# mode): bounds its queue and memory under a burst (router/request/sched.py).
DEFAULT_MAX_QUEUED = 1024
# Refuse a request while the queue ahead of it holds more than this many seconds of starts at the
# measured start rate: a burst leaves at most this much backlog behind, so the steady traffic's
# goodput comes back soon after it (issue 18, item 4). The cluster's default TTFT SLO (2 s): a
# request that would wait longer cannot meet it anyway, and a retry-after tells its client when to
# come back. 0: no bound.
DEFAULT_MAX_QUEUE_WAIT_S = 2.0
START_WINDOW_S = 10.0    # seconds of backlog the start rate is measured over
START_MIN_BUSY_S = 0.02  # ... and the least it needs before it says anything (a batch of starts within
                         # a few milliseconds is not a rate)


class StartRate:
    """Requests per second that get their first token while others wait (a busy server's rate).

    Measured over the last `window_s` seconds of backlog (the sum of the gaps between first tokens
    with others waiting), not over a count of starts: one batched prefill gives many first tokens
    within a millisecond, and a window of a few dozen gaps would read that as thousands a second."""

    def __init__(self, window_s: float = START_WINDOW_S, min_busy_s: float = START_MIN_BUSY_S):
        self.window_s, self.min_busy_s = window_s, min_busy_s
        self._gaps: collections.deque = collections.deque()
        self._busy = 0.0                     # sum of _gaps
        self._last: float | None = None

    def started(self, now: float, backlog: int) -> None:
        """A request got its first token at `now` with `backlog` others still waiting for theirs."""
        if self._last is not None and backlog > 0:
            gap = max(1e-6, now - self._last)
            self._gaps.append(gap)
            self._busy += gap
            while len(self._gaps) > 1 and self._busy - self._gaps[0] >= self.window_s:
                self._busy -= self._gaps.popleft()
        self._last = now if backlog > 0 else None

    def rate(self) -> float | None:
        """Starts per second, or None before 4 gaps spanning min_busy_s of backlog were measured."""
        if len(self._gaps) < 4 or self._busy < self.min_busy_s:
            return None
        return len(self._gaps) / self._busy


def predicted_ttft_s(ahead: int, start_rate: float | None, prompt_tokens: int, prefill_rate: float | None) -> float:
    """The module docstring's prediction; unknown rates count as no wait / no prefill time."""
    wait = ahead / start_rate if start_rate else 0.0
    return wait + (prompt_tokens / prefill_rate if prefill_rate else 0.0)


def retry_after_s(predicted_s: float, slo_s: float) -> int:
    """Whole seconds to wait before a retry could meet the SLO (at least 1)."""
    return max(1, math.ceil(predicted_s - slo_s))


def queue_retry_after_s(excess: int, start_rate: float | None) -> int:
    """Whole seconds until `excess` queued requests got their first token at `start_rate`
    (requests/s; unknown: 1 s), at least 1."""
    return max(1, math.ceil(excess / start_rate)) if start_rate else 1
