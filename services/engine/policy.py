"""Ordering hooks for the scheduler: who is admitted first, who is preempted first."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from services.engine.queue_order import (DEFAULT_AGING_S, DISPLACE_RATIO, MAX_DISPLACEMENTS, PROMPT_TOKEN_COST, SJF, displaces,
                                         order_key, remaining_work)
from services.engine.request import Request


class SchedulingPolicy:
    """FCFS: admit in arrival order; preempt the most recently arrived running request."""

    name = "fcfs"
    displace_ratio = 0.0        # only sjf displaces (SjfPolicy.displacement_victim)

    def key(self, request: Request) -> tuple:
        return (request.arrival_time,)

    def admission_order(self, waiting: Iterable[Request]) -> list[Request]:
        return sorted(waiting, key=self.key)

    def preemption_victim(self, running: list[Request]) -> Request:
        return max(running, key=self.key)

    def displacement_victim(self, head: Request, running: list[Request],
                            keeps_kv: Callable[[Request], bool], now: float | None = None) -> Request | None:
        """A running request whose batch slot `head` (first in admission order, every slot
        taken) should have now, or None. Only sjf displaces. now: the clock aging reads
        (None: time.monotonic(); the simulator passes its virtual clock)."""
        return None


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

    def __init__(self, aging_s: float = DEFAULT_AGING_S, displace_ratio: float = DISPLACE_RATIO):
        self.aging_s, self.displace_ratio = aging_s, displace_ratio

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

    def displacement_victim(self, head: Request, running: list[Request],
                            keeps_kv: Callable[[Request], bool], now: float | None = None) -> Request | None:
        """queue_order.displaces: the running request of head's priority class or lower, not aged,
        displaced fewer than MAX_DISPLACEMENTS times, with the most predicted work left, when head's
        work is small enough beside it. keeps_kv(r): r's KV would be kept compressed (no recompute
        to pay), else its switch cost is its computed tokens at the prompt-token rate."""
        if not self.displace_ratio:
            return None
        now = time.monotonic() if now is None else now
        candidates = [r for r in running if r.priority <= head.priority and r.num_displaced < MAX_DISPLACEMENTS
                      and not r.layers_done and now - r.arrival_time < self.aging_s]
        if not candidates:
            return None
        victim = self.preemption_victim(candidates)
        cost = 0.0 if keeps_kv(victim) else victim.num_computed_tokens * PROMPT_TOKEN_COST
        return victim if displaces(predicted_work(head), predicted_work(victim), cost, self.displace_ratio) else None


POLICIES = {p.name: p for p in (SchedulingPolicy, PriorityPolicy, SjfPolicy)}


def make_policy(name: str, aging_s: float = DEFAULT_AGING_S, displace_ratio: float = DISPLACE_RATIO) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; use one of {', '.join(POLICIES)}")
    return SjfPolicy(aging_s, displace_ratio) if name == SJF else POLICIES[name]()
