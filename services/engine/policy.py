"""Ordering hooks for the scheduler: who is admitted first, who is preempted first."""
from __future__ import annotations

from collections.abc import Iterable

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


POLICIES = {p.name: p for p in (SchedulingPolicy, PriorityPolicy)}


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; use one of {', '.join(POLICIES)}")
    return POLICIES[name]()
