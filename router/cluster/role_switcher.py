"""Adaptive pools: the leading router switches instances between prefill, decode and both.

Every `interval_s` it reads every serving instance's load (a Stats call each, concurrently),
asks `role_policy.decide` for at most one switch and sends it as a SetRole call. The worker
applies a switch in one engine call (the engine's role and step cap, the servicer's accepted
RPCs and its published record change together) and answers its new LoadReport, which goes
straight into the router's registry so placement uses the new role at once. A switch that fails
(the worker died, refused because it is draining, timed out) changes nothing on the router's side;
the worker's own record stays the truth, so a new leader starts from what the workers report.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from router.cluster.leader_rounds import fresh_reports, leads, rounds
from router.cluster.registry import InstanceRegistry
from router.cluster.role_policy import RoleDecision, RolePolicyConfig, decide
from services.async_tasks import stop_task
from services.roles import Role, role_label
from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.router.roles")

SWITCHABLE_ROLES = (Role.PREFILL, Role.DECODE, Role.COLOCATED)


class RoleSwitcher:
    def __init__(self, registry: InstanceRegistry, pool: WorkerPool, config: RolePolicyConfig, *,
                 interval_s: float = 0.25, leader=None, enabled: bool = True, stats_timeout_s: float = 1.0,
                 switch_timeout_s: float = 5.0, on_switch: Callable[[str, str], None] = lambda old, new: None):
        """on_switch(old role name, new role name) runs after each applied switch (metrics)."""
        self.registry, self.pool, self.config, self.on_switch = registry, pool, config, on_switch
        self.interval_s, self.leader, self.enabled = interval_s, leader, enabled
        self.stats_timeout_s, self.switch_timeout_s = stats_timeout_s, switch_timeout_s
        self.last_switch: dict[str, float] = {}        # instance_id → time.monotonic() of its last switch
        self.switches = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="role-switcher")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    @property
    def acting(self) -> bool:
        return leads(self.leader)

    async def _loop(self) -> None:
        await rounds(self.interval_s, lambda: self.acting, self.round, log, "role switching")

    async def loads(self) -> list[worker_pb2.LoadReport]:
        """Fresh reports of every serving instance that answers Stats in time."""
        reports = [r for role in SWITCHABLE_ROLES for r in self.registry.instances(role)]
        return await fresh_reports(self.pool, reports, self.stats_timeout_s)

    async def round(self) -> RoleDecision | None:
        """One decision (made and applied), or None."""
        loads = await self.loads()
        home = {r.instance_id: r.home_role for r in loads if r.home_role != worker_pb2.ROLE_UNSPECIFIED}
        decision = decide(loads, home, self.last_switch, time.monotonic(), self.config)
        if decision is None:
            return None
        report = next(r for r in loads if r.instance_id == decision.instance_id)
        return decision if await self.switch(report, decision) else None

    async def switch(self, report: worker_pb2.LoadReport, d: RoleDecision) -> bool:
        """Send one SetRole; True once the worker applied it."""
        self.last_switch[d.instance_id] = time.monotonic()      # a failed try waits its dwell time too
        try:
            new = await self.pool.stub(report.address).SetRole(worker_pb2.SetRoleRequest(
                role=d.role, mixed_prefill_tokens=d.mixed_prefill_tokens, reason=d.reason),
                timeout=self.switch_timeout_s)
        except grpc.aio.AioRpcError as e:
            log.warning("role switch of %s to %s not applied (%s): %s %s", d.instance_id, role_label(d.role),
                        d.reason, e.code().name, e.details())
            return False
        self.registry.observe(new)
        if d.role == report.role:          # role_policy rule 4: a new cap, not a switch
            log.info("prefill cap of %s (%s): %s", d.instance_id, role_label(d.role), d.reason)
            return True
        self.switches += 1
        self.on_switch(role_label(report.role), role_label(d.role))
        log.info("role switch: %s %s -> %s (%s; prefill cap %d tokens/step)", d.instance_id,
                 role_label(report.role), role_label(d.role), d.reason, d.mixed_prefill_tokens)
        return True
