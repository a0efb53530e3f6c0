"""Builds and runs one worker: engine thread, KV transport, gRPC server, Redis record."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from services import allocator
from services.engine.engine_thread import EngineThread, serial_torch_elsewhere
from services.engine.settings import ENGINE_DEFAULTS
from services.metrics_http import MetricsServer
from services.prefix_stream import PrefixPublisher
from services.registry import InstancePublisher
from services.auth import MetadataAuthInterceptor, cluster_token, cluster_token_check
from services.member_tls import member_tls
from services.roles import Role, WorkerState
from services.transport import KVLayout, make_receiver, make_sender
from services.worker import metrics as worker_metrics
from services.worker.kv_push import PrefillPusher
from services.worker.migration_out import MigrationConfig
from services.worker.observed_sender import ObservedSender
from services.worker.request_context import SERVICE_PREFIX as WORKER_SERVICE, RequestContextInterceptor
from services.grpc_backlog import SERVER_BACKLOG_OPTIONS
from services.worker.output_sinks import OutputSinks
from services.worker.servicer import WorkerServicer
from services.worker.settings import WORKER_DEFAULTS
from tandem.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from services.engine.engine import LLMEngine

log = logging.getLogger("tandem.worker")
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.so_reuseport", 0), *SERVER_BACKLOG_OPTIONS]


@dataclass
class WorkerOptions:
    role: str = "colocated"                 # prefill | decode | colocated
    # engine: defaults and meaning in services/engine/settings.py
    model: str = ENGINE_DEFAULTS.model
    dtype: str = ENGINE_DEFAULTS.dtype
    device: str = ENGINE_DEFAULTS.device
    gpu_memory_utilization: float | None = ENGINE_DEFAULTS.gpu_memory_utilization
    block_size: int = ENGINE_DEFAULTS.block_size
    num_blocks: int | None = ENGINE_DEFAULTS.num_blocks
    kv_memory_gib: float = ENGINE_DEFAULTS.kv_memory_gib
    max_num_batched_tokens: int = ENGINE_DEFAULTS.max_num_batched_tokens
    max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs
    max_model_len: int | None = ENGINE_DEFAULTS.max_model_len
    threads: int | None = ENGINE_DEFAULTS.threads
    enable_prefix_caching: bool = ENGINE_DEFAULTS.enable_prefix_caching
    queue_policy: str = ENGINE_DEFAULTS.queue_policy
    queue_aging_s: float = ENGINE_DEFAULTS.queue_aging_s
    displace_ratio: float = ENGINE_DEFAULTS.displace_ratio
    mixed_prefill: str = ENGINE_DEFAULTS.mixed_prefill
    preemption_mode: str = ENGINE_DEFAULTS.preemption_mode
    kv_compress_fraction: float = ENGINE_DEFAULTS.kv_compress_fraction
    host: str = "127.0.0.1"
    port: int = 0                           # 0: a free port
    kv_port: int = 0
    kv_advertise_address: str | None = None # data-plane HOST:PORT peers are told to use; None: the bound one
    kv_transport: str = WORKER_DEFAULTS.kv_transport
    redis_url: str | None = None
    cluster: str = "default"
    instance_id: str | None = None
    cpu_cores: tuple[int, ...] = ()        # pin the process to these cores (models a device on CPU)
    # worker: defaults and meaning in services/worker/settings.py
    lease_ms: int = WORKER_DEFAULTS.lease_ms
    layer_group: int = WORKER_DEFAULTS.layer_group
    transfer_timeout_s: float = WORKER_DEFAULTS.transfer_timeout_s
    heartbeat_ttl_s: float = WORKER_DEFAULTS.heartbeat_ttl_s
    heartbeat_interval_s: float = WORKER_DEFAULTS.heartbeat_interval_s
    grace_s: float = WORKER_DEFAULTS.grace_s
    orphan_grace_s: float = WORKER_DEFAULTS.orphan_grace_s
    metrics_port: int | None = None         # /metrics and /health over HTTP on host:port; 0: a free port; None: off
    log_format: str = "text"                # text | json (services/log_setup.py); read by __main__
    log_level: str = "info"
    # live migration (decode and colocated instances)
    migration_stop_copy_blocks: int = WORKER_DEFAULTS.migration_stop_copy_blocks
    migration_max_stages: int = WORKER_DEFAULTS.migration_max_stages
    max_migrations: int = WORKER_DEFAULTS.max_migrations
    migration_watermark: float = WORKER_DEFAULTS.migration_watermark
    migration_lease_ms: int = WORKER_DEFAULTS.migration_lease_ms


def pin_cores(cores: tuple[int, ...]) -> None:
    """Restrict this process (and threads it starts later) to `cores`; one torch thread per core."""
    if not cores:
        return
    available = os.sched_getaffinity(0)
    chosen = {c for c in cores if c in available} or available
    os.sched_setaffinity(0, chosen)
    import torch
    torch.set_num_threads(len(chosen))


class Worker:
    """One worker process's parts. `start()` then `wait()`; `stop()` is graceful and idempotent."""

    def __init__(self, opts: WorkerOptions):
        self.opts = opts
        self.role = Role.from_label(opts.role)
        if self.role is None:
            raise ValueError(f"--role {opts.role!r} is not a role; use prefill, decode or colocated")
        pin_cores(opts.cpu_cores)
        self.instance_id = opts.instance_id or f"{opts.role}-{socket.gethostname()}-{os.getpid()}"
        self.engine_thread = EngineThread(lambda: self._build_engine(opts, self.role),
                                          name=f"engine-{self.instance_id}")
        self.engine = self.engine_thread.engine
        serial_torch_elsewhere()       # the engine thread alone runs parallel torch ops (engine_thread.py)
        cfg = self.engine.config
        self.dtype = str(cfg.dtype).removeprefix("torch.")    # resolved (never "auto"): reports, metrics
        self.layout = KVLayout.of(self.engine.runner.kv, cfg.model.model_id)
        self.engine_thread.on_step = worker_metrics.step_observer(self.instance_id, opts.role)
        self.cluster_token = cluster_token()     # services/auth.py: worker RPCs and the KV data plane need it
        self.sender = ObservedSender(make_sender(opts.kv_transport, self.layout, timeout_s=opts.transfer_timeout_s,
                                                 token=self.cluster_token), self.instance_id)
        self.receiver = make_receiver(opts.kv_transport, self.layout, self.engine.runner.kv, host=opts.host,
                                      port=opts.kv_port, timeout_s=opts.transfer_timeout_s, token=self.cluster_token)
        # What peers are told (LoadReport.kv_address, KVHandle.address): e.g. the pod IP when bound to 0.0.0.0.
        self.kv_address = opts.kv_advertise_address or self.receiver.address
        self.pusher = None
        if self.role == Role.PREFILL:
            self.pusher = PrefillPusher(self.engine.kv.block_table, cfg.cache.block_size, cfg.model.num_layers,
                                        opts.layer_group)
            self.engine.on_prefill_layer = self.pusher
            self.engine.on_forked = self.pusher.push_whole
        self.state = WorkerState.STARTING
        self.address = ""
        self.publisher = None
        self.prefix_publisher: PrefixPublisher | None = None     # the prefix cache told to routers
        self._publishing: asyncio.Future | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()
        self.servicer: WorkerServicer | None = None
        self.metrics_server: MetricsServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    @staticmethod
    def _build_engine(opts: WorkerOptions, role: Role) -> LLMEngine:
        """The engine, built on the thread that will step it (EngineThread calls this there)."""
        from services.engine.builder import build_engine
        engine = build_engine(
            opts.model, dtype=opts.dtype, device=opts.device, block_size=opts.block_size, num_blocks=opts.num_blocks,
            kv_memory_gib=opts.kv_memory_gib, max_num_batched_tokens=opts.max_num_batched_tokens,
            max_num_seqs=opts.max_num_seqs, role=role, num_threads=opts.threads or None,
            enable_prefix_caching=opts.enable_prefix_caching, max_model_len=opts.max_model_len,
            gpu_memory_utilization=opts.gpu_memory_utilization, policy=opts.queue_policy,
            aging_s=opts.queue_aging_s, displace_ratio=opts.displace_ratio, mixed_prefill_mode=opts.mixed_prefill,
            preemption_mode=opts.preemption_mode, kv_compress_fraction=opts.kv_compress_fraction)
        if engine.config.device == "cpu":
            # Build or load the CPU kernels (decode attention, fused elementwise ops) now, before
            # serving: built lazily, the first step would stall every request behind a compile
            # (~20-40 s on a fresh cache). Every role needs them (the fused ops serve prefill too).
            from services.engine.attention_ops import load_kernels
            load_kernels()
        if opts.redis_url and opts.enable_prefix_caching:
            engine.kv.record_prefix_events()      # before the engine's loop starts: no event is missed
        return engine

    def current_state(self) -> str:
        """starting | serving | draining | drained (draining, and nothing left here) | stopping."""
        if self.state != WorkerState.DRAINING or self.servicer is None:
            return self.state
        load, sv = self.engine_thread.load, self.servicer
        empty = not (load.running or load.waiting or len(sv.leases) or len(sv.sources)
                     or len(sv.targets))
        return WorkerState.DRAINED if empty else WorkerState.DRAINING

    def set_state(self, state: str) -> None:
        """Enter (`draining`) or leave (`serving`) draining, and publish it at once."""
        self.state = state
        log.info("worker %s is now %s", self.instance_id, state)
        # Readiness (service tandem.v1.Worker) follows: a draining pod is the one Kubernetes removes
        # first on scale-down. Liveness (service "") stays SERVING: draining is not dying.
        status = health_pb2.HealthCheckResponse.SERVING if state == WorkerState.SERVING else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.ensure_future(self.health.set("tandem.v1.Worker", status))
        if self.publisher:
            asyncio.ensure_future(self.publisher.publish_now())

    def _publish_soon(self) -> None:
        """Publish the load report now, off the caller's path (a reservation was refused for room:
        routers placed by an older report). One at a time; a no-op without Redis."""
        if self.publisher is None or (self._publishing is not None and not self._publishing.done()):
            return
        self._publishing = asyncio.ensure_future(self.publisher.publish_now())

    def _publish_now(self) -> None:
        if self.publisher:
            asyncio.ensure_future(self.publisher.publish_now())

    def report(self) -> worker_pb2.LoadReport:
        """This worker's load record now: its own fields merged with the engine thread's latest."""
        cfg, sv = self.engine.config, self.servicer
        leases = sv.leases if sv else None
        report = worker_pb2.LoadReport(
            instance_id=self.instance_id, role=sv.role if sv else self.role, home_role=self.role,
            address=self.address, kv_address=self.kv_address, state=self.current_state(), model=cfg.model.model_id,
            block_size=cfg.cache.block_size, max_model_len=cfg.max_model_len, vocab_size=cfg.model.vocab_size,
            kv_transport=self.opts.kv_transport, dtype=self.dtype, updated_unix_ms=int(time.time() * 1e3),
            mixed_prefill_tokens=sv.mixed_prefill_tokens if sv else 0, role_switches=sv.role_switches if sv else 0,
            migrations_in_flight=(len(sv.sources) + len(sv.targets)) if sv else 0,
            reserved_blocks=(leases.reserved_blocks + sv.targets.reserved_blocks) if leases is not None else 0,
            leases=len(leases) if leases is not None else 0)
        report.MergeFrom(self.engine_thread.load)        # the engine's fields: blocks, requests, rates
        return report

    def metrics_snapshot(self) -> worker_metrics.WorkerSnapshot:
        """This worker's state for a /metrics scrape (the load report plus the transport's totals)."""
        r, sent, received = self.report(), self.sender.stats(), self.receiver.stats()
        outputs = self.servicer.outputs if self.servicer is not None else OutputSinks()
        return worker_metrics.WorkerSnapshot(
            report=r, kv_sent_bytes=sent.get("bytes_sent", 0), kv_sent_transfers=sent.get("transfers", 0),
            kv_send_failures=sent.get("failures", 0), kv_send_aborts=sent.get("aborts", 0),
            kv_received_bytes=received.get("bytes_received", 0),
            kv_received_transfers=received.get("transfers_committed", 0),
            kv_receive_refusals=received.get("transfers_refused", 0),
            outputs_streams=len(outputs), output_chunks_muxed=outputs.muxed_chunks,
            output_chunks_own=outputs.own_chunks, **self._preemption_totals())

    def _preemption_totals(self) -> dict:
        """The engine's preemption counters (read across threads: ints, copied)."""
        sched = self.engine.scheduler
        p = sched.preemption
        return {"preemptions": tuple(sorted(dict(p.counts).items())), "kv_restores": p.restored,
                "kv_compressed_bytes": sched.kv_store.bytes_used}

    async def _start_metrics(self) -> None:
        """Serve /metrics first, so a port clash fails before the worker registers anywhere."""
        if self.opts.metrics_port is None:
            return
        self.metrics_server = MetricsServer(worker_metrics.REGISTRY, self.opts.host, self.opts.metrics_port,
                                            health=lambda: self.state == WorkerState.SERVING)
        await self.metrics_server.start()
        worker_metrics.track(self.instance_id, self.metrics_snapshot)
        log.info("worker %s metrics on http://%s/metrics", self.instance_id, self.metrics_server.address)

    async def start(self) -> str:
        opts = self.opts
        await self._start_metrics()
        members_only = ([MetadataAuthInterceptor((WORKER_SERVICE,), cluster_token_check(self.cluster_token))]
                        if self.cluster_token else [])
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=members_only + [RequestContextInterceptor()])
        if opts.redis_url:
            self.publisher = InstancePublisher(opts.redis_url, opts.cluster, self.report, ttl_s=opts.heartbeat_ttl_s,
                                               interval_s=opts.heartbeat_interval_s)
        self.servicer = WorkerServicer(
            self.engine_thread, role=self.role, sender=self.sender, receiver=self.receiver, pusher=self.pusher,
            lease_ms=opts.lease_ms, transfer_timeout_s=opts.transfer_timeout_s, report_fn=self.report, instance_id=self.instance_id, kv_transport=opts.kv_transport,
            state_fn=self.current_state, set_state_fn=self.set_state, on_role_change=self._publish_now, on_full=self._publish_soon,
            migration=MigrationConfig(stop_copy_blocks=opts.migration_stop_copy_blocks,
                                      max_stages=opts.migration_max_stages, max_in_flight=opts.max_migrations,
                                      lease_ms=opts.migration_lease_ms, transfer_timeout_s=opts.transfer_timeout_s),
            watermark_blocks=int(opts.migration_watermark * self.engine.kv.num_blocks), kv_address=self.kv_address,
            orphan_grace_s=opts.orphan_grace_s)
        worker_pb2_grpc.add_WorkerServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        tls = member_tls()
        listen = f"{opts.host}:{opts.port}"
        port = self.server.add_insecure_port(listen) if tls is None else \
            self.server.add_secure_port(listen, tls.server_credentials())
        if port == 0:
            raise OSError(f"cannot listen on {opts.host}:{opts.port}")
        if tls is not None:
            log.info("worker %s: mutual TLS on its gRPC port (certificates of the cluster's CA only, name %s)",
                     self.instance_id, tls.server_name)
        self.address = f"{opts.host}:{port}"
        await self.server.start()
        self.state = WorkerState.SERVING
        for service in ("", "tandem.v1.Worker"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.engine.kv.prefix_events is not None:       # first: a router that sees this instance finds its cache
            self.prefix_publisher = PrefixPublisher(
                opts.redis_url, opts.cluster, self.instance_id, self.engine.kv.block_size, self.engine.kv.prefix_events,
                lambda: self.servicer._engine_call(lambda e: e.kv.prefix_snapshot()))
            await self.prefix_publisher.start()
        if self.publisher:
            await self.publisher.start()
        advertised = "" if self.kv_address == self.receiver.address else f" (advertised as {self.kv_address})"
        log.info("worker %s (%s) serving on %s, KV on %s%s, allocator %s", self.instance_id, opts.role, self.address,
                 self.receiver.address, advertised, allocator.loaded())
        return self.address

    async def stop(self) -> None:
        """Stop taking work, finish or cancel in-flight RPCs within the grace period, free everything."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.state = WorkerState.STOPPING
        await self.health.enter_graceful_shutdown()
        if self.publisher:
            await self.publisher.stop()       # leave placement first
        if self.prefix_publisher:
            await self.prefix_publisher.stop()
        if self.servicer:
            self.servicer.outputs.drain()     # routers' Outputs streams end with the last request using them
            self.servicer.parked.close()      # nothing is kept for a router now; streams cut below are not parked
        if self.server:
            await self.server.stop(self.opts.grace_s)
        if self.servicer:
            for rid in self.servicer.leases.pending_ids():
                await self.servicer.leases.release(rid, "the instance is stopping")
            await self.servicer.targets.close()
            await self.servicer.peers.close()
        self.sender.close()
        self.receiver.close()
        self.engine_thread.shutdown()
        if self.metrics_server is not None:
            worker_metrics.untrack(self.instance_id)
            await self.metrics_server.stop()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(opts: WorkerOptions) -> None:
    """Run a worker until SIGTERM/SIGINT; prints `ready <instance_id> <address>` once serving, plus
    ` metrics=<host:port>` when /metrics is on."""
    worker = Worker(opts)
    address = await worker.start()
    metrics = f" metrics={worker.metrics_server.address}" if worker.metrics_server else ""
    print(f"ready {worker.instance_id} {address}{metrics}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.stop()))
    await worker.wait()
