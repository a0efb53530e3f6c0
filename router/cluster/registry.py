"""The router's view of the cluster: every worker's LoadReport, polled from Redis.

A poll SCANs `tandem:{cluster}:instance:*` and MGETs the values in one round trip. A worker that
dies stops refreshing its record, Redis expires it after its TTL, and the next poll drops it: a
dead worker stops being placed within ttl + poll_interval_s. If Redis itself is unreachable the
last good view is kept (and the outage logged once), so placement goes on from slightly stale
loads rather than failing every request. When Redis answers again after an outage, or answers as
another server (its run_id changed: a restart or a failover, which lose records), instances of the
last view that are missing are kept for recovery_grace_s while the workers re-publish (every
heartbeat), instead of the cluster looking empty until they do.

Single-threaded asyncio: readers (instances, get, all) never await and always see one complete
poll, because each poll replaces the whole view at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from google.protobuf import json_format
from redis.exceptions import ResponseError

from services.async_tasks import stop_task
from services.registry import REDIS_DOWN, connect, decode_report, instance_pattern
from services.roles import WorkerState
from tandem.v1 import worker_pb2

log = logging.getLogger(__name__)

LoadReport = worker_pb2.LoadReport

DEFAULT_RECOVERY_GRACE_S = 5.0       # > a worker's heartbeat interval (1 s by default), with room for a slow one


class InstanceRegistry:
    """Polls instance records every poll_interval_s between start() and stop().

    on_change, if given, is called with the new view (instance_id → LoadReport) after a poll in
    which an instance appeared, disappeared or changed state; load-only changes do not call it.
    An exception in it is logged and does not stop polling.
    """

    def __init__(self, redis_url: str, cluster: str, poll_interval_s: float = 0.5,
                 on_change: Callable[[Mapping[str, LoadReport]], None] | None = None,
                 recovery_grace_s: float = DEFAULT_RECOVERY_GRACE_S):
        self._url, self.cluster, self.poll_interval_s = redis_url, cluster, poll_interval_s
        self.recovery_grace_s = recovery_grace_s
        self._server_run_id: str | None = None    # Redis's run_id at the last poll (changes on a restart)
        self._keep_until = 0.0                    # time.monotonic() until which missing records are kept
        self._on_change = on_change
        self._view: dict[str, LoadReport] = {}
        self._unreachable: dict[str, int] = {}   # instance_id → updated_unix_ms it was marked at
        self._malformed_keys: set[bytes] = set()    # logged once until they parse again
        self._redis = None
        self._task: asyncio.Task | None = None
        self._failing = False

    async def start(self) -> None:
        """Poll once at once (so the view is filled when this returns, if Redis answers), then
        keep polling in the background. Never raises on a Redis error: it logs and retries."""
        self._redis = connect(self._url, timeout_s=max(self.poll_interval_s, 1.0))
        await self.refresh()
        self._task = asyncio.create_task(self._poll_loop(), name="instance-registry")

    async def stop(self) -> None:
        """Stop polling; the last view stays readable. Safe to call twice or before start()."""
        await stop_task(self._task)
        self._task = None
        if self._redis is not None:
            with contextlib.suppress(*REDIS_DOWN):
                await self._redis.aclose()
            self._redis = None

    async def refresh(self) -> bool:
        """One poll now. True if the view now reflects Redis; False (view unchanged) if Redis
        could not be read. Requires start()."""
        if self._redis is None:
            raise RuntimeError("InstanceRegistry: call start() first (or it was stopped)")
        try:
            keys = list(dict.fromkeys([k async for k in self._redis.scan_iter(
                match=instance_pattern(self.cluster), count=1000)]))
            values = await self._redis.mget(keys) if keys else []
            run_id = await self._run_id()
        except REDIS_DOWN as e:
            if not self._failing:
                log.warning("cannot poll instances from Redis (%s); keeping the last view of "
                            "%d instances", e, len(self._view))
            self._failing = True
            return False
        restarted = run_id is not None and self._server_run_id not in (None, run_id)
        if self._failing or restarted:
            self._keep_until = time.monotonic() + self.recovery_grace_s
            log.info("Redis reachable again%s; keeping the last view's instances for %.1fs while they re-publish",
                     " (a restarted or failed-over server)" if restarted else "", self.recovery_grace_s)
        self._failing = False
        self._server_run_id = run_id or self._server_run_id
        self._install(self._decode(keys, values))
        return True

    async def _run_id(self) -> str | None:
        """The server's run_id (None where INFO is not allowed, as on some managed Redis)."""
        try:
            return (await self._redis.info("server")).get("run_id")
        except ResponseError:
            return None

    def _decode(self, keys: list[bytes], values: list[bytes | None]) -> dict[str, LoadReport]:
        view: dict[str, LoadReport] = {}
        for key, value in zip(keys, values):
            if value is None:                    # expired between SCAN and MGET
                continue
            try:
                report = decode_report(value)
            except json_format.ParseError as e:
                if key not in self._malformed_keys:
                    self._malformed_keys.add(key)
                    log.warning("ignoring malformed instance record %s: %s", key.decode(), e)
                continue
            self._malformed_keys.discard(key)
            view[report.instance_id] = report
        return view

    def _install(self, view: dict[str, LoadReport]) -> None:
        if time.monotonic() < self._keep_until:       # Redis came back without them: not dead, not yet re-published
            view = {**{i: r for i, r in self._view.items() if i not in view}, **view}
        old, self._view = self._view, view
        for instance_id, marked_at in list(self._unreachable.items()):
            report = view.get(instance_id)
            if report is None or report.updated_unix_ms > marked_at:
                del self._unreachable[instance_id]
        if self._on_change is not None and _states(old) != _states(view):
            try:
                self._on_change(view)
            except Exception:
                log.exception("InstanceRegistry on_change hook failed")

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.refresh()

    def instances(self, role: int | None = None,
                  states: Iterable[str] | None = (WorkerState.SERVING,)) -> list[LoadReport]:
        """Placeable instances, sorted by instance_id: of `role` (a worker_pb2.Role value; None:
        any) and in one of `states` (None: any), excluding those marked unreachable."""
        states = None if states is None else frozenset(states)
        return [r for i, r in sorted(self._view.items())
                if i not in self._unreachable
                and (role is None or r.role == role)
                and (states is None or r.state in states)]

    def observe(self, report: LoadReport) -> None:
        """Take a report fresher than the polled record of its instance (a worker's answer, e.g.
        to SetRole): placement sees it before the next poll. Ignored when older than the view's,
        or for an instance the view does not hold (its record is the registry's to add)."""
        current = self._view.get(report.instance_id)
        if current is not None and report.updated_unix_ms >= current.updated_unix_ms:
            self._view[report.instance_id] = report

    def get(self, instance_id: str) -> LoadReport | None:
        """The instance's latest record, unreachable or not; None if it has none."""
        return self._view.get(instance_id)

    def all(self) -> list[LoadReport]:
        """Every record in any state, unreachable ones included, sorted by instance_id."""
        return [r for _, r in sorted(self._view.items())]

    def mark_unreachable(self, instance_id: str) -> None:
        """The router saw UNAVAILABLE from this instance: exclude it from instances() until a
        record newer than the current one arrives (or its record disappears). No-op for an
        instance without a record."""
        report = self._view.get(instance_id)
        if report is not None:
            self._unreachable[instance_id] = report.updated_unix_ms

    def is_unreachable(self, instance_id: str) -> bool:
        return instance_id in self._unreachable


def _states(view: Mapping[str, LoadReport]) -> dict[str, str]:
    return {i: r.state for i, r in view.items()}
