"""A worker's presence in Redis: its LoadReport under a heartbeat TTL.

Key (shared with the router, which reads it in router/cluster/registry.py):

    tandem:{cluster}:instance:{instance_id}              LoadReport as JSON, expires after ttl_s

A worker's reservations are in its LoadReport (`leases`, `reserved_blocks`), which the router reads
(placement, draining); there is no record per lease: nothing read it, and writing and deleting one
sat on the path of every request.

Records are JSON with proto field names and enum names, so `redis-cli GET` shows them readably.
For the worker Redis is advisory: its engine owns blocks and leases, Redis only advertises them.
So no publisher method raises on a Redis error: it logs, reports False, and the heartbeat keeps
retrying. A worker whose process dies stops being placed once its record's TTL runs out.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from google.protobuf import json_format
from redis.exceptions import RedisError

from services import redis_url
from services.async_tasks import stop_task
from tandem.v1 import worker_pb2

log = logging.getLogger(__name__)

REDIS_DOWN = (RedisError, OSError)           # what a lost or slow Redis raises


def instance_key(cluster: str, instance_id: str) -> str:
    return f"tandem:{cluster}:instance:{instance_id}"


def instance_pattern(cluster: str) -> str:
    """SCAN pattern matching every instance record of the cluster."""
    return instance_key(cluster, "*")


def encode_report(report: worker_pb2.LoadReport) -> str:
    """One-line JSON with every field (zeros included), proto field names and enum names."""
    return json_format.MessageToJson(report, preserving_proto_field_name=True, indent=None,
                                     always_print_fields_with_no_presence=True)


def decode_report(data: str | bytes) -> worker_pb2.LoadReport:
    """Inverse of encode_report; unknown fields (from a newer worker) are ignored.
    Raises json_format.ParseError on a malformed record."""
    return json_format.Parse(data, worker_pb2.LoadReport(), ignore_unknown_fields=True)


connect = redis_url.connect      # the one place a Redis URL (plain or redis+sentinel://) becomes a client


def now_unix_ms() -> int:
    return int(time.time() * 1000)


class InstancePublisher:
    """Keeps this worker's LoadReport in Redis while it runs.

    report_fn is called for every publish and must return a report whose instance_id is the
    same on every call (it names the key). Publishing stamps updated_unix_ms on a copy; the
    caller's message is not modified. Requires interval_s < ttl_s, else the record would lapse
    between heartbeats.
    """

    def __init__(self, redis_url: str, cluster: str,
                 report_fn: Callable[[], worker_pb2.LoadReport],
                 ttl_s: float = 3.0, interval_s: float = 1.0):
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"need 0 < interval_s < ttl_s, got interval_s={interval_s} "
                             f"ttl_s={ttl_s}")
        self._url, self.cluster, self._report_fn = redis_url, cluster, report_fn
        self.ttl_s, self.interval_s = ttl_s, interval_s
        self._redis: aioredis.Redis | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()          # one publish at a time: a newer report is never
        self._stopped = False                # overwritten by an older one still in flight
        self.instance_id: str | None = None
        self.registered = False              # the last publish reached Redis
        self._failing = False                # the last publish failed (logged once)

    async def start(self) -> None:
        """Publish at once, then every interval_s. If Redis is unreachable this logs and the
        heartbeat keeps trying; the worker is simply not placed until a publish lands.
        Raises ValueError if report_fn returns an empty instance_id, RuntimeError if called
        twice (a publisher is started once and stopped once)."""
        if self._redis is not None or self._stopped:
            raise RuntimeError("InstancePublisher.start() called twice")
        self.instance_id = self._report_fn().instance_id
        if not self.instance_id:
            raise ValueError("report_fn returned a LoadReport without instance_id")
        self._redis = connect(self._url, timeout_s=min(self.interval_s, 2.0))
        await self.publish_now()
        self._task = asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.instance_id}")

    async def publish_now(self) -> bool:
        """Publish the current report (call on a state change). True if Redis took it. A no-op
        returning False after stop()."""
        async with self._lock:
            if self._stopped or self._redis is None:
                return False
            report = worker_pb2.LoadReport()
            report.CopyFrom(self._report_fn())
            if report.instance_id != self.instance_id:
                raise ValueError(f"report_fn changed instance_id from {self.instance_id!r} "
                                 f"to {report.instance_id!r}")
            report.updated_unix_ms = now_unix_ms()
            key = instance_key(self.cluster, self.instance_id)
            try:
                await self._redis.set(key, encode_report(report), px=int(self.ttl_s * 1000))
            except REDIS_DOWN as e:
                if not self._failing:
                    log.warning("instance %s: cannot publish to Redis (%s); retrying every "
                                "%.1fs", self.instance_id, e, self.interval_s)
                self.registered, self._failing = False, True
                return False
            if not self.registered:
                log.info("instance %s: published to Redis as %s", self.instance_id, key)
            self.registered, self._failing = True, False
            return True

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.publish_now()
            except Exception:                # a bug in report_fn must not stop the heartbeat
                log.exception("instance %s: heartbeat failed", self.instance_id)

    async def stop(self) -> None:
        """Stop the heartbeat and delete the record so the router stops placing here at once.
        Never raises; safe to call twice or before start()."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        async with self._lock:
            self._stopped = True
        if self._redis is None:
            return
        try:
            await self._redis.delete(instance_key(self.cluster, self.instance_id))
        except REDIS_DOWN as e:
            log.warning("instance %s: could not delete its Redis record (%s); it expires in "
                        "%.1fs", self.instance_id, e, self.ttl_s)
        with contextlib.suppress(*REDIS_DOWN):
            await self._redis.aclose()
        self._redis, self.registered = None, False
