"""A worker's Prometheus metrics, all named `tandem_*` and labeled `instance` (the Tandem instance id).

Registry: one process-wide `REGISTRY` (not prometheus_client's default one, so a router and a
worker built in one test process never serve each other's series). Every series carries the
instance id, so several Worker objects in one process stay apart; a worker's /metrics serves
the whole registry (in a deployment: one worker per process). Event metrics (counters,
histograms) are module-level objects fed by the functions below, safe from any thread; state
gauges are read at scrape time from every tracked worker's snapshot (`track`/`untrack`), so a
scrape never shows a stopped worker and never blocks on the engine.

Migration API (the live-migration code calls these on the SOURCE instance, the one a request
leaves, so started = committed + aborted + in progress):

    from services.worker import metrics
    metrics.migration_started(instance_id)                       # a migration of one request began
    metrics.migration_committed(instance_id, downtime_s, stages) # the destination committed and resumed
    metrics.migration_aborted(instance_id, reason)               # it ended without commit; r stays here

`downtime_s`: seconds the request did not decode (pause before stop-and-copy → resumed on the
destination). `stages`: copy rounds including the final stop-and-copy (>= 1). `reason`: a short
snake_case word from a small fixed set (e.g. "destination_full", "transfer_failed",
"request_finished", "cancelled", "timeout"); never a free-form message (each value is a series).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.load import used_blocks
from services.roles import WORKER_STATES, role_label
from tandem.v1 import worker_pb2

prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry()
ProcessCollector(namespace="tandem_worker", registry=REGISTRY)


ENGINE_STEP = Histogram(
    "tandem_engine_step_seconds", "Duration of engine steps that computed tokens (schedule, execute, update)",
    ["instance", "role"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0))
ENGINE_TOKENS = Counter(
    "tandem_engine_tokens_total", "Tokens computed by the engine: prefill (prompt positions) and decode (sampled)",
    ["instance", "role", "kind"], registry=REGISTRY)
KV_TRANSFER_WINDOW = Histogram(
    "tandem_kv_transfer_window_seconds",
    "Committed KV transfers (sending side): first byte on the wire until the receiver's ACK",
    ["instance"], registry=REGISTRY,
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
LEASES_EXPIRED = Counter(
    "tandem_leases_expired_total", "Decode reservations freed because their KV did not arrive before the deadline",
    ["instance"], registry=REGISTRY)
MIGRATIONS_STARTED = Counter(
    "tandem_migrations_started_total", "Live migrations begun by this (source) instance", ["instance"],
    registry=REGISTRY)
MIGRATIONS_COMMITTED = Counter(
    "tandem_migrations_committed_total", "Live migrations that committed on the destination", ["instance"],
    registry=REGISTRY)
MIGRATIONS_ABORTED = Counter(
    "tandem_migrations_aborted_total", "Live migrations that ended without commit, by reason",
    ["instance", "reason"], registry=REGISTRY)
MIGRATION_DOWNTIME = Histogram(
    "tandem_migration_downtime_seconds", "Time a migrating request did not decode (stop-and-copy until resumed)",
    ["instance"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
MIGRATION_STAGES = Histogram(
    "tandem_migration_stages", "Copy stages of committed migrations, the final stop-and-copy included",
    ["instance"], registry=REGISTRY, buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20))


# ---- event API (any thread) -------------------------------------------------------------------
def migration_started(instance: str) -> None:
    MIGRATIONS_STARTED.labels(instance).inc()


def migration_committed(instance: str, downtime_s: float, stages: int) -> None:
    """Raises ValueError for a negative downtime or stages < 1 (a caller bug, not a user error)."""
    if downtime_s < 0 or stages < 1:
        raise ValueError(f"migration_committed: downtime_s {downtime_s} must be >= 0 and stages {stages} >= 1")
    MIGRATIONS_COMMITTED.labels(instance).inc()
    MIGRATION_DOWNTIME.labels(instance).observe(downtime_s)
    MIGRATION_STAGES.labels(instance).observe(stages)


def migration_aborted(instance: str, reason: str) -> None:
    MIGRATIONS_ABORTED.labels(instance, reason or "unknown").inc()


def lease_expired(instance: str) -> None:
    LEASES_EXPIRED.labels(instance).inc()


def kv_transfer_committed(instance: str, window_s: float) -> None:
    KV_TRANSFER_WINDOW.labels(instance).observe(max(0.0, window_s))


def step_observer(instance: str, role: str) -> Callable[[float, int, int], None]:
    """A callback for EngineThread.on_step: (step seconds, prefill tokens, decoded tokens). Creating
    it creates the series, so an idle instance shows 0 rather than no data."""
    step = ENGINE_STEP.labels(instance, role)
    prefill = ENGINE_TOKENS.labels(instance, role, "prefill")
    decode = ENGINE_TOKENS.labels(instance, role, "decode")

    def observe(step_s: float, prefill_tokens: int, decode_tokens: int) -> None:
        step.observe(step_s)
        if prefill_tokens:
            prefill.inc(prefill_tokens)
        if decode_tokens:
            decode.inc(decode_tokens)

    return observe


# ---- state gauges, read at scrape time ----------------------------------------------------------
@dataclass(frozen=True)
class WorkerSnapshot:
    """What a worker shows at one scrape: its load record and the totals that are not load.
    Counters (`kv_*`, `output_chunks_*`) are totals since the worker started."""
    report: worker_pb2.LoadReport       # the one load record (services/load.py); series are labelled by home_role
    kv_sent_bytes: int = 0
    kv_sent_transfers: int = 0
    kv_send_failures: int = 0
    kv_send_aborts: int = 0
    kv_received_bytes: int = 0
    kv_received_transfers: int = 0
    kv_receive_refusals: int = 0
    outputs_streams: int = 0            # routers' open Outputs streams (output_sinks.py)
    output_chunks_muxed: int = 0        # token chunks sent through them
    output_chunks_own: int = 0          # token chunks sent on their request's own stream
    preemptions: tuple[tuple[str, int], ...] = ()   # (mode, count): services/engine/preemption.py
    kv_restores: int = 0                # compressed preempted requests restored
    kv_compressed_bytes: int = 0        # compressed copies held now

    @property
    def instance(self) -> str:
        return self.report.instance_id

    @property
    def role(self) -> str:
        return role_label(self.report.home_role)


class _WorkerCollector:
    def __init__(self):
        self._lock = threading.Lock()
        self._sources: dict[str, Callable[[], WorkerSnapshot]] = {}

    def track(self, instance: str, snapshot: Callable[[], WorkerSnapshot]) -> None:
        with self._lock:
            self._sources[instance] = snapshot

    def untrack(self, instance: str) -> None:
        with self._lock:
            self._sources.pop(instance, None)

    def describe(self):
        return []           # families vary with the tracked workers; nothing to check at register time

    def collect(self) -> Iterator:
        with self._lock:
            sources = list(self._sources.values())
        snaps = [s() for s in sources]
        lab = ["instance", "role"]

        def gauge(name, doc, value_of):
            g = GaugeMetricFamily(name, doc, labels=lab)
            for s in snaps:
                g.add_metric([s.instance, s.role], value_of(s))
            return g

        yield gauge("tandem_kv_blocks_total", "KV blocks in this instance's pool", lambda s: s.report.total_blocks)
        yield gauge("tandem_kv_blocks_free", "KV blocks free (evictable prefix-cache blocks count as free)",
                    lambda s: s.report.free_blocks)
        yield gauge("tandem_kv_blocks_used", "KV blocks held by requests or reservations",
                    lambda s: used_blocks(s.report))
        yield gauge("tandem_kv_blocks_reserved", "KV blocks held by leases whose KV has not arrived (part of used)",
                    lambda s: s.report.reserved_blocks)
        yield gauge("tandem_engine_running_requests", "Requests in the engine's running set", lambda s: s.report.running)
        yield gauge("tandem_engine_waiting_requests", "Requests queued in the engine (queue length)",
                    lambda s: s.report.waiting)
        yield gauge("tandem_queued_prefill_tokens", "Prompt tokens queued for prefill, not computed yet",
                    lambda s: s.report.queued_prefill_tokens)
        yield gauge("tandem_leases", "Live decode reservations", lambda s: s.report.leases)
        yield gauge("tandem_worker_outputs_streams", "Routers' open Outputs streams (a step's tokens per message)",
                    lambda s: s.outputs_streams)
        chunks = CounterMetricFamily("tandem_worker_output_chunks", "Token chunks streamed to routers, by path: "
                                     "outputs (a router's Outputs stream) or own (the request's stream)",
                                     labels=["instance", "path"])
        for s in snaps:
            chunks.add_metric([s.instance, "outputs"], s.output_chunks_muxed)
            chunks.add_metric([s.instance, "own"], s.output_chunks_own)
        yield chunks
        info = GaugeMetricFamily("tandem_worker_info", "Static facts about the instance (value 1)",
                                 labels=["instance", "role", "model", "kv_transport", "dtype"])
        state = GaugeMetricFamily("tandem_worker_state", "1 for the instance's current state, 0 for the others",
                                  labels=["instance", "role", "state"])
        for s in snaps:
            r = s.report
            info.add_metric([s.instance, s.role, r.model, r.kv_transport, r.dtype], 1)
            for name in WORKER_STATES + (() if r.state in WORKER_STATES else (r.state,)):
                state.add_metric([s.instance, s.role, name], 1 if name == r.state else 0)
        yield info
        yield state
        yield from self._transfer_counters(snaps)
        yield from self._preemption_metrics(snaps)

    @staticmethod
    def _preemption_metrics(snaps: list[WorkerSnapshot]) -> Iterator:
        modes = CounterMetricFamily("tandem_preemptions", "Requests preempted for KV blocks, by what they lost: "
                                    "recompute (their KV) or compress (kept in int8, restored on resume)",
                                    labels=["instance", "mode"])
        restores = CounterMetricFamily("tandem_kv_restores", "Compressed preempted requests restored",
                                       labels=["instance"])
        held = GaugeMetricFamily("tandem_kv_compressed_bytes", "Bytes of compressed KV held for preempted requests",
                                 labels=["instance"])
        for s in snaps:
            for mode, n in s.preemptions:
                modes.add_metric([s.instance, mode], n)
            restores.add_metric([s.instance], s.kv_restores)
            held.add_metric([s.instance], s.kv_compressed_bytes)
        yield from (modes, restores, held)

    @staticmethod
    def _transfer_counters(snaps: list[WorkerSnapshot]) -> Iterator:
        lab = ["instance", "direction"]
        nbytes = CounterMetricFamily("tandem_kv_transfer_bytes", "KV bytes moved over the data plane", labels=lab)
        done = CounterMetricFamily("tandem_kv_transfers", "KV transfers committed (sent: ACKed; received: accepted)",
                                   labels=lab)
        failed = CounterMetricFamily(
            "tandem_kv_transfer_failures",
            "KV transfers that failed (sent: error, timeout or refusal; received: commit refused)", labels=lab)
        aborted = CounterMetricFamily("tandem_kv_transfer_aborts",
                                      "KV transfers the sender abandoned (request cancelled or prefill failed)",
                                      labels=["instance"])
        for s in snaps:
            nbytes.add_metric([s.instance, "sent"], s.kv_sent_bytes)
            nbytes.add_metric([s.instance, "received"], s.kv_received_bytes)
            done.add_metric([s.instance, "sent"], s.kv_sent_transfers)
            done.add_metric([s.instance, "received"], s.kv_received_transfers)
            failed.add_metric([s.instance, "sent"], s.kv_send_failures)
            failed.add_metric([s.instance, "received"], s.kv_receive_refusals)
            aborted.add_metric([s.instance], s.kv_send_aborts)
        yield from (nbytes, done, failed, aborted)


_COLLECTOR = _WorkerCollector()
REGISTRY.register(_COLLECTOR)


def track(instance: str, snapshot: Callable[[], WorkerSnapshot]) -> None:
    """Export `snapshot()`'s gauges for `instance` from now on (replaces an earlier source)."""
    _COLLECTOR.track(instance, snapshot)
    for reason_free in (MIGRATIONS_STARTED, MIGRATIONS_COMMITTED, LEASES_EXPIRED):
        reason_free.labels(instance)          # 0, not "no data", until the first event
    for histogram in (MIGRATION_DOWNTIME, MIGRATION_STAGES, KV_TRANSFER_WINDOW):
        histogram.labels(instance)


def untrack(instance: str) -> None:
    """Stop exporting `instance`'s gauges (its counters keep their totals). A no-op when unknown."""
    _COLLECTOR.untrack(instance)
