"""Ordering hooks for the scheduler: who is admitted first, who is preempted first."""
from __future__ import annotations

import time
from collections.abc import Iterable

from services.engine.queue_order import DEFAULT_AGING_S, SJF, order_key, remaining_work
from services.engine.request import Request


class SchedulingPolicy:
    """FCFS: admit in arrival order; preempt the most recently arrived running request."""

    name = "fcfs"

    def key(self, request: Request) -> tuple:
        return (request.arrival_time,)

    def admission_order(self, waiting: Iterable[Request]) -> list[Request]:
        return sorted(waiting, key=self.key)

    def preemption_victim(self, running: list[Request]) -> Request:
        return max(running, key=self.key)


class PriorityPolicy(SchedulingPolicy):
    """Higher `priority` first (the client API's meaning: 0 is normal, more is more important),
    FCFS within a priority."""

    name = "priority"

    def key(self, request: Request) -> tuple:
        return (-request.priority, request.arrival_time)


def predicted_work(request: Request) -> float:
    """queue_order.remaining_work of an engine request: tokens it still has to compute (prompt, or
    prompt + output again after a preemption) plus its predicted output left (the router's
    prediction, else max_tokens; a prefill-only request produces one token here)."""
    if request.handoff:
        predicted = 1
    else:
        predicted = request.predicted_output_tokens or request.sampling_params.max_tokens
    left = request.num_tokens - request.num_computed_tokens
    return remaining_work(left if left > 1 or request.num_output_tokens == 0 else 0, predicted,
                          request.num_output_tokens)


class SjfPolicy(SchedulingPolicy):
    """Shortest predicted remaining work first, priority classes first, aging after `aging_s`
    (services/engine/queue_order.py states the bound). Preempts the lowest priority, then the one
    with the most predicted work left."""

    name = SJF

    def __init__(self, aging_s: float = DEFAULT_AGING_S):
        self.aging_s = aging_s

    def _key(self, request: Request, now: float) -> tuple:
        return order_key(SJF, priority=request.priority, arrival=request.arrival_time,
                         work=predicted_work(request), now=now, aging_s=self.aging_s)

    def key(self, request: Request) -> tuple:
        return self._key(request, time.monotonic())

    def admission_order(self, waiting: Iterable[Request]) -> list[Request]:
        now = time.monotonic()
        return sorted(waiting, key=lambda r: self._key(r, now))

    def preemption_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (-r.priority, predicted_work(r), r.arrival_time))


POLICIES = {p.name: p for p in (SchedulingPolicy, PriorityPolicy, SjfPolicy)}


def make_policy(name: str, aging_s: float = DEFAULT_AGING_S) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; use one of {', '.join(POLICIES)}")
    return SjfPolicy(aging_s) if name == SJF else POLICIES[name]()
