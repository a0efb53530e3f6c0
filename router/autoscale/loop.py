"""The autoscaler's controller: every interval_s, while this router holds the leader lock, read
loads and replica counts, decide (router/autoscale/autoscaler.py), drain a decode instance by migration when
one is to go, and set the Deployments' replicas.

    autoscaler = Autoscaler(config, deployments={Pool.PREFILL: "tandem-prefill", ...},
                            scaler=DeploymentScaler(...), loads=registry.all, leader=lock,
                            drain_instance=drain)
    autoscaler.start(); ...; await autoscaler.stop()

Contracts of the collaborators:
- scaler: `get_replicas(name) -> int` and `set_replicas(name, n, expected=m) -> int`, synchronous
  (run in a worker thread), raising ScalerError subclasses (router/autoscale/k8s_scaler.py);
- loads: returns every instance record now (the router's InstanceRegistry.all);
- leader: has `is_leader` (router/cluster/leader_lock.py); a router that does not lead does nothing;
- drain_instance(instance_id) -> bool, async: True once the instance is drained (its requests
  migrated away, it takes no new work), at once for one already drained; False if it could not,
  in which case the callable leaves the instance serving. The replica is removed only after True, then drain_settle_s later (so the
  drained pod fails its readiness probe and the ReplicaSet deletes it first among its pods).

Failures never stop the loop and never log a traceback per tick: a ScalerError is logged once
per distinct message until a tick succeeds; a drain that fails or times out postpones that
scale-down by the scale-down cooldown.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from router.autoscale.autoscaler import (AutoscalerConfig, Decision, Pool, PoolDecision, ScalerState,
                                         decide)
from router.autoscale.k8s_scaler import ScalerError
from tandem.v1 import worker_pb2

log = logging.getLogger(__name__)


class ReplicaScaler(Protocol):
    def get_replicas(self, name: str) -> int: ...
    def set_replicas(self, name: str, replicas: int, *, expected: int | None = None) -> int: ...


class Leader(Protocol):
    @property
    def is_leader(self) -> bool: ...


class Autoscaler:
    """See the module docstring. clock (monotonic seconds) and sleep are injectable so tests
    drive cooldowns and the drain settle time without waiting."""

    def __init__(self, config: AutoscalerConfig, *, deployments: Mapping[Pool, str],
                 scaler: ReplicaScaler, loads: Callable[[], Sequence[worker_pb2.LoadReport]],
                 leader: Leader, drain_instance: Callable[[str], Awaitable[bool]],
                 interval_s: float = 15.0, drain_timeout_s: float = 600.0,
                 drain_settle_s: float = 15.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        missing = [p.value for p in Pool if not deployments.get(p)]
        if missing:
            raise ValueError(f"Autoscaler: no Deployment name for {', '.join(missing)}")
        if interval_s <= 0 or drain_timeout_s <= 0 or drain_settle_s < 0:
            raise ValueError("Autoscaler: need interval_s > 0, drain_timeout_s > 0, "
                             "drain_settle_s >= 0")
        self.config, self.deployments = config, dict(deployments)
        self._scaler, self._loads, self._leader, self._drain = scaler, loads, leader, drain_instance
        self.interval_s, self.drain_timeout_s, self.drain_settle_s = (interval_s, drain_timeout_s,
                                                                      drain_settle_s)
        self._clock, self._sleep = clock, sleep
        self.state: ScalerState | None = None     # None while not leading: a new leader starts fresh
        self.last_decision: Decision | None = None
        self._task: asyncio.Task | None = None
        self._last_error: str | None = None

    def start(self) -> None:
        """Run tick() every interval_s in the background. RuntimeError if already running."""
        if self._task is not None:
            raise RuntimeError("Autoscaler already started")
        self._task = asyncio.create_task(self._run(), name="autoscaler")

    async def stop(self) -> None:
        """Stop the loop (a drain in progress is cancelled). Safe to call twice or unstarted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as e:            # a bug must not end autoscaling, nor flood the log
                message = f"tick failed: {type(e).__name__}: {e}"
                if message != self._last_error:
                    log.exception("autoscaler: %s (same failures are not logged again)", message)
                    self._last_error = message
            await self._sleep(self.interval_s)

    async def tick(self) -> Decision | None:
        """One round. Returns the decision, or None when not leading or the replica counts could
        not be read. Never raises a ScalerError (it is logged)."""
        if not self._leader.is_leader:
            if self.state is not None:
                log.info("autoscaler: not the leader any more; idle")
            self.state = None
            return None
        now = self._clock()
        if self.state is None:
            log.info("autoscaler: leading; scaling %s", ", ".join(
                f"{p.value}={self.deployments[p]}" for p in Pool))
            self.state = ScalerState.fresh(now)
        try:
            replicas = {p: await asyncio.to_thread(self._scaler.get_replicas, self.deployments[p])
                        for p in Pool}
        except ScalerError as e:
            self._error(e)
            return None
        decision = decide(self._loads(), replicas, self.state, now, self.config)
        self.state, self.last_decision = decision.state, decision
        ok = True
        for d in decision:
            if d.direction:
                ok = await self._act(d) and ok
        if ok and self._last_error is not None:
            log.info("autoscaler: working again")
            self._last_error = None
        return decision

    async def _act(self, d: PoolDecision) -> bool:
        """Carry out one pool's change; False if the API refused it."""
        name = self.deployments[d.pool]
        if d.direction < 0 and d.drain is not None:
            if not await self._drained(d.drain):
                self.state = self.state.recorded(d.pool, -1, self._clock())
                return True
            await self._sleep(self.drain_settle_s)
            if not self._leader.is_leader:
                log.info("autoscaler: lost leadership after draining %s; not scaling", d.drain)
                return True
        if not self._leader.is_leader:
            return True
        try:
            await asyncio.to_thread(self._scaler.set_replicas, name, d.target, expected=d.current)
        except ScalerError as e:
            self._error(e)
            return False
        log.info("autoscaler: %s %d → %d replicas: %s", name, d.current, d.target, d.reason)
        self.state = self.state.recorded(d.pool, d.direction, self._clock())
        return True

    async def _drained(self, instance_id: str) -> bool:
        log.info("autoscaler: draining %s by migration before removing a decode replica",
                 instance_id)
        try:
            ok = await asyncio.wait_for(self._drain(instance_id), self.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("autoscaler: draining %s took over %.0fs; keeping the replica", instance_id,
                        self.drain_timeout_s)
            return False
        except Exception as e:                # the drain mechanism's failure is not ours to raise
            log.warning("autoscaler: draining %s failed (%s: %s); keeping the replica",
                        instance_id, type(e).__name__, e)
            return False
        if not ok:
            log.warning("autoscaler: %s could not be drained; keeping the replica", instance_id)
        return bool(ok)

    def _error(self, e: ScalerError) -> None:
        message = f"{type(e).__name__}: {e}"
        if message != self._last_error:
            log.warning("autoscaler: %s (retrying every %.0fs)", message, self.interval_s)
            self._last_error = message
