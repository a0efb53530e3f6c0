"""The engine's queue policy on the simulator's clock.

An instance orders its queues with the engine's own policy object (services/engine/policy.py,
`make_policy`). A policy whose order depends on the time (SJF's aging: `_key(request, now)`) reads
the wall clock in the engine; here it gets the virtual clock instead, so a run stays deterministic.
Policies that do not look at the time (FCFS, priority) are called as they are.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from services.engine.policy import make_policy


class VirtualClockPolicy:
    def __init__(self, name: str, clock: Callable[[], float]):
        self.policy = make_policy(name)
        self.name = self.policy.name
        self.displace_ratio = self.policy.displace_ratio      # 0: this policy never displaces
        self._clock = clock
        self._timed = getattr(self.policy, "_key", None)      # (request, now) → key, for time-dependent orders

    def key(self, request) -> tuple:
        return self._timed(request, self._clock()) if self._timed else self.policy.key(request)

    def admission_order(self, waiting: Iterable) -> list:
        if not self._timed:
            return self.policy.admission_order(waiting)
        now = self._clock()
        return sorted(waiting, key=lambda r: self._timed(r, now))

    def preemption_victim(self, running: list):
        return self.policy.preemption_victim(running)

    def displacement_victim(self, head, running: list, keeps_kv):
        return self.policy.displacement_victim(head, running, keeps_kv, now=self._clock())
