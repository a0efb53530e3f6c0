"""The rescheduler: every `interval_s` (50–100 ms) read the decode instances' loads and migrate.

Loads come straight from the workers (a Stats call each, concurrently), not from the Redis
records, which are up to one heartbeat old. `migration_policy.decide` turns them into decisions
(drain, de-fragmentation, priority headroom, balance); each decision becomes one Migrate call to
its source, which picks the request with the decision's selector and drives the copy. A pair of
instances is used by at most one migration this router started until that call returns.

With several routers only the holder of the Redis leader lock acts (`leader`); without a lock
(a single router, tests) it always acts. Drain is also available on demand (`drain`), for the
admin API and the autoscaler, whether or not this router leads.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from router.migration.policy import MIGRATING_ROLES, MigrationDecision, PolicyConfig, decide, migration_groups
from router.cluster.leader_rounds import fresh_reports, leads, rounds
from router.cluster.registry import InstanceRegistry
from router.settings import RESCHEDULE_INTERVAL_S
from services.async_tasks import stop_task
from services.roles import LIVE_STATES, WorkerState
from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.router.rescheduler")



@dataclass
class RescheduleStats:
    rounds: int = 0
    started: int = 0
    committed: int = 0
    aborted: dict[str, int] = field(default_factory=dict)     # reason → count
    failed: int = 0                                           # the Migrate call itself failed


class Rescheduler:
    def __init__(self, registry: InstanceRegistry, pool: WorkerPool, config: PolicyConfig | None = None, *,
                 interval_s: float = RESCHEDULE_INTERVAL_S, leader=None, demand_fn: Callable[[], int] = lambda: 0,
                 stats_timeout_s: float = 1.0, migrate_timeout_s: float = 120.0, enabled: bool = True):
        self.registry, self.pool = registry, pool
        self.config = config or PolicyConfig()
        self.interval_s, self.leader, self.demand_fn = interval_s, leader, demand_fn
        self.stats_timeout_s, self.migrate_timeout_s = stats_timeout_s, migrate_timeout_s
        self.enabled = enabled
        self.stats = RescheduleStats()
        self._busy: set[str] = set()                 # instances in a migration this router started
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.enabled and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="rescheduler")

    async def stop(self) -> None:
        await stop_task(self._loop_task)
        self._loop_task = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)

    @property
    def acting(self) -> bool:
        return leads(self.leader)

    async def _loop(self) -> None:
        await rounds(self.interval_s, lambda: self.acting, self.round, log, "rescheduling")

    # ---- one round ---------------------------------------------------------------------------
    async def loads(self) -> list[worker_pb2.LoadReport]:
        """Fresh loads of every decode/colocated instance that answers Stats in time."""
        reports = [r for role in MIGRATING_ROLES for r in self.registry.instances(role, LIVE_STATES)]
        return await fresh_reports(self.pool, reports, self.stats_timeout_s)

    async def round(self, only_source: str | None = None) -> list[MigrationDecision]:
        """Decide and launch this round's migrations (not awaited). With `only_source`, only
        decisions that move requests off that instance."""
        self.stats.rounds += 1
        loads = await self.loads()
        by_id = {report.instance_id: report for report in loads}
        # A migration this router launched counts until the worker's own report shows it.
        in_flight = dict.fromkeys(self._busy, 1)
        decisions = []
        for group in migration_groups(loads):          # within one pool only
            decisions += decide(group, self.config, self.demand_fn(), in_flight)
        launched = []
        for d in decisions:
            if only_source is not None and d.source != only_source:
                continue
            if d.source in self._busy or d.destination in self._busy:
                continue
            self._launch(d, by_id[d.source], by_id[d.destination])
            launched.append(d)
        return launched

    def _launch(self, d: MigrationDecision, src: worker_pb2.LoadReport, dst: worker_pb2.LoadReport) -> None:
        self._busy.update((d.source, d.destination))
        task = asyncio.ensure_future(self.migrate(src, dst, request_id=d.request_id, selector=d.selector,
                                                  reason=d.reason))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self._busy.difference_update((d.source, d.destination))
        task.add_done_callback(done)

    async def migrate(self, src: worker_pb2.LoadReport, dst: worker_pb2.LoadReport, *, request_id: str = "",
                      selector: str = "shortest", reason: str = "manual") -> worker_pb2.MigrateResponse | None:
        """One Migrate call to `src`; its answer, or None if the call failed (logged and counted)."""
        self.stats.started += 1
        req = worker_pb2.MigrateRequest(request_id=request_id, selector=selector, reason=reason,
                                        destination_instance_id=dst.instance_id, destination_address=dst.address)
        try:
            resp = await self.pool.stub(src.address).Migrate(req, timeout=self.migrate_timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED):
                log.info("migration %s → %s (%s) not started: %s %s", src.instance_id, dst.instance_id, reason,
                         e.code().name, e.details())
            self.stats.failed += 1
            return None
        if resp.committed:
            self.stats.committed += 1
            log.info("%s: moved %s from %s to %s (downtime %.1f ms)", reason, resp.request_id, src.instance_id,
                     dst.instance_id, resp.downtime_s * 1e3)
        else:
            self.stats.aborted[resp.abort_reason] = self.stats.aborted.get(resp.abort_reason, 0) + 1
        return resp

    # ---- drain -------------------------------------------------------------------------------
    async def drain(self, instance_id: str, timeout_s: float = 600.0) -> tuple[str, int]:
        """Move every request off a draining instance, round after round, until it reports
        `drained` or `timeout_s` passes. Returns (state, requests left)."""
        deadline = time.monotonic() + timeout_s
        while True:
            report = await self._stats(instance_id)
            if report is None:
                return "gone", 0
            left = report.running + report.waiting + report.leases
            if report.state != WorkerState.DRAINING or time.monotonic() > deadline:
                return report.state, left
            if self.acting or self._loop_task is None:   # else the leader's loop moves them
                await self.round(only_source=instance_id)
            await asyncio.sleep(self.interval_s)

    async def _stats(self, instance_id: str) -> worker_pb2.LoadReport | None:
        record = self.registry.get(instance_id)
        if record is None:
            return None
        try:
            return await self.pool.stub(record.address).Stats(worker_pb2.StatsRequest(), timeout=self.stats_timeout_s)
        except grpc.aio.AioRpcError:
            return None
