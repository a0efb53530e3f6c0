"""The router process: tandem.v1.Serving (front door), tandem.v1.Admin and gRPC health."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from router.request import choices
from router.client_auth import ClientAuth
from router.request.dispatch import Dispatcher, RouteError, RoutedRequest
from router.http_frontends import HttpFrontends
from router.cluster.leader_lock import LeaderLock
from router.metrics import RouterMetrics
from router.migration.policy import MIGRATING_ROLES, PolicyConfig
from router.prefill_rate import fastest_prefill_rate
from router.request.admission import DEFAULT_ADMISSION, DEFAULT_MAX_QUEUE_WAIT_S, DEFAULT_MAX_QUEUED
from router.cluster.pools_args import DEFAULT_POOLS
from router.cluster.prefix_index import PrefixIndex, PrefixIndexFollower
from router.request.routing_args import DEFAULT_ROUTING, ROUTING_MODES
from router.request.redispatch import DEFAULT_MAX_REDISPATCHES, Redispatcher
from router.cluster.registry import InstanceRegistry
from router.migration.rescheduler import LIVE_STATES, Rescheduler
from router.cluster.role_policy import RolePolicyConfig
from router.cluster.role_switcher import RoleSwitcher
from router.request.validation import build_request_async
from router.request.sched import RequestScheduling, ScheduledRequests, SchedulingCollector, load_warm_start
from router.settings import RESCHEDULE_INTERVAL_S, ROUTER_DEFAULTS
from services.auth import cluster_token
from services.grpc_backlog import SERVER_BACKLOG_OPTIONS
from services.worker_pool import CHANNEL_OPTIONS, WorkerPool
from services.engine.builder import load_tokenizer
from services.engine.loader import resolve_model
from services.engine.queue_order import DEFAULT_AGING_S, DEFAULT_QUEUE_POLICY
from services.engine.sampling_params import InvalidRequestError
from services.roles import WorkerState, pool_role, role_label
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2

log = logging.getLogger("tandem.router")


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, router: "Router"):
        self.router = router

    async def Generate(self, request, context):
        r = self.router
        try:
            rr = await build_request_async(request, r.model, r.tokenizer, context.time_remaining())
        except InvalidRequestError as e:
            r.metrics.rejected("grpc", "invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if rr.request_id in r.live:
            r.metrics.rejected("grpc", "already_exists")
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id {rr.request_id!r} is already running; use a unique id")
        r.live[rr.request_id] = rr
        index = 0
        # choice → its next token index; a resumed request goes on after the tokens the client has
        indices: dict[int, int] = {0: len(rr.resume_token_ids)} if rr.resume_token_ids else {}
        try:
            stream = choices.stream(rr, lambda c: r.metrics.track(c, r.requests.generate(c), "grpc"),
                                    keep_logprobs=request.params.HasField("logprobs"))
            async for message in stream:
                index = indices.get(message.choice, 0)
                if message.index != index:        # the contract the client relies on
                    raise RouteError(grpc.StatusCode.INTERNAL, f"token index {message.index} arrived, {index} expected")
                indices[message.choice] = index + len(message.token_ids)
                message.request_id = rr.request_id
                yield message
        except RouteError as e:
            if getattr(e, "retry_after_s", 0):
                context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not rr.aborted and task is not None and task.cancelling():
                raise                                  # the client went away: nothing more to send
            if not rr.aborted:              # cancelled inside the router, not by the client: never leave it hanging
                log.error("request %s: a worker call was cancelled inside the router", rr.request_id)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"request {rr.request_id}: the router lost its "
                                    f"worker call (cancelled inside the router); retry")
            yield serving_pb2.GenerateResponse(request_id=rr.request_id, index=index, finished=True,
                                               finish_reason=serving_pb2.FINISH_REASON_ABORT)
        finally:
            r.live.pop(rr.request_id, None)

    async def Abort(self, request, context):
        rr = self.router.live.get(request.request_id)
        if rr is not None:
            rr.abort()
        return serving_pb2.AbortResponse(found=rr is not None)

    async def ListModels(self, request, context):
        m = self.router.model
        return serving_pb2.ListModelsResponse(models=[serving_pb2.ModelInfo(
            id=m.model_id, max_model_len=m.max_position_embeddings, vocab_size=m.vocab_size)])


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, router: "Router"):
        self.router = router

    async def ListInstances(self, request, context):
        await self.router.registry.refresh()
        return admin_pb2.ListInstancesResponse(instances=self.router.registry.all())

    async def Migrate(self, request: admin_pb2.AdminMigrateRequest, context):
        r = self.router
        if not request.request_id or not request.to_instance_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and to_instance_id are both required")
        await r.registry.refresh()
        dst = r.registry.get(request.to_instance_id)
        if dst is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"to_instance_id: no instance {request.to_instance_id!r}; "
                                f"see `tandem admin instances`")
        if pool_role(dst) not in MIGRATING_ROLES or dst.state != WorkerState.SERVING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"to_instance_id: {dst.instance_id} is a "
                                f"{role_label(pool_role(dst))} instance in state {dst.state}; migrations go to "
                                f"serving decode (or colocated) instances")
        src = await self._holder(request.request_id)
        if src is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: {request.request_id!r} is not running on any "
                                f"decode instance (finished, not started, or still in prefill)")
        if src.instance_id == dst.instance_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{request.request_id!r} already runs on {dst.instance_id}")
        if pool_role(src) != pool_role(dst):        # (a decode instance serving both roles is still one)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{request.request_id!r} runs on a "
                                f"{role_label(pool_role(src))} instance; move it to another one of that role")
        try:
            return await r.pool.stub(src.address).Migrate(worker_pb2.MigrateRequest(
                request_id=request.request_id, destination_instance_id=dst.instance_id,
                destination_address=dst.address, reason="manual"), timeout=context.time_remaining() or 120.0)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), f"{src.instance_id}: {e.details()}")

    async def _holder(self, request_id: str):
        """The decode/colocated instance the request runs on now (asks each one)."""
        r = self.router
        candidates = [x for role in MIGRATING_ROLES for x in r.registry.instances(role, LIVE_STATES)]

        async def has(inst):
            try:
                s = await r.pool.stub(inst.address).Stats(worker_pb2.StatsRequest(list_requests=True), timeout=5.0)
            except grpc.aio.AioRpcError:
                return False
            return any(q.request_id == request_id for q in s.requests)
        found = await asyncio.gather(*(has(x) for x in candidates))
        return next((x for x, ok in zip(candidates, found) if ok), None)

    async def Drain(self, request: admin_pb2.DrainRequest, context):
        r = self.router
        await r.registry.refresh()
        inst = r.registry.get(request.instance_id)
        if inst is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"instance_id: no instance {request.instance_id!r}; "
                                f"see `tandem admin instances`")
        try:
            report = await r.pool.stub(inst.address).SetState(
                worker_pb2.SetStateRequest(state=WorkerState.SERVING if request.undo else WorkerState.DRAINING), timeout=10.0)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), f"{inst.instance_id}: {e.details()}")
        await r.registry.refresh()
        if request.undo or not request.wait:
            return admin_pb2.DrainResponse(state=report.state, remaining=report.running + report.waiting + report.leases)
        state, left = await r.rescheduler.drain(inst.instance_id, request.timeout_s or 600.0)
        return admin_pb2.DrainResponse(state=state, remaining=left)


class Router:
    def __init__(self, model: str, redis_url: str, *, cluster: str = "default", host: str = "127.0.0.1",
                 port: int = ROUTER_DEFAULTS.port, lease_ms: int = ROUTER_DEFAULTS.lease_ms,
                 poll_interval_s: float = ROUTER_DEFAULTS.poll_interval_s,
                 reschedule: bool = True, reschedule_interval_s: float = RESCHEDULE_INTERVAL_S, policy: PolicyConfig | None = None,
                 queue_timeout_s: float = ROUTER_DEFAULTS.queue_timeout_s, http_port: int | None = None, metrics_port: int | None = None,
                 http_host: str | None = None, pools: str = DEFAULT_POOLS, role_policy: RolePolicyConfig | None = None,
                 routing: str = DEFAULT_ROUTING,
                 max_redispatches: int = DEFAULT_MAX_REDISPATCHES, queue_policy: str = DEFAULT_QUEUE_POLICY,
                 queue_aging_s: float = DEFAULT_AGING_S, admission: str = DEFAULT_ADMISSION,
                 predictor_warm_start: str | None = None, api_keys: Iterable[str] = (),
                 max_queued_requests: int = DEFAULT_MAX_QUEUED,
                 max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S):
        """api_keys: client API keys (router/client_auth.py; none: the client APIs are open)."""
        loaded = resolve_model(model, weights=False)
        self.model, self.tokenizer = loaded.config, load_tokenizer(loaded)
        self.host, self.port = host, port
        self.pool = WorkerPool()
        self.registry = InstanceRegistry(   # channels to instances that left are closed
            redis_url, cluster, poll_interval_s=poll_interval_s,
            on_change=self._instances_changed)
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing {routing!r}: use one of {', '.join(ROUTING_MODES)}")
        self.routing = routing
        # --routing prefix: the router's copy of every worker's prefix cache, followed from Redis.
        self.prefix_index = PrefixIndex() if routing == "prefix" else None
        self.prefix_follower = None if self.prefix_index is None else PrefixIndexFollower(
            redis_url, cluster, self.prefix_index, lambda: [r.instance_id for r in self.registry.all()])
        self.dispatcher = Dispatcher(self.registry, self.pool, lease_ms=lease_ms, queue_timeout_s=queue_timeout_s,
                                     prefix_index=self.prefix_index, queue_policy=queue_policy, aging_s=queue_aging_s)
        # One router of the cluster reschedules (and autoscales): the holder of the Redis leader lock.
        self.leader = LeaderLock(redis_url, cluster)
        self.rescheduler = Rescheduler(self.registry, self.pool, policy, interval_s=reschedule_interval_s,
                                       leader=self.leader, demand_fn=self.dispatcher.pending_demand_blocks,
                                       enabled=reschedule)
        self.live: dict[str, RoutedRequest] = {}
        self.metrics = RouterMetrics(self.registry.all, queued=lambda: len(self.dispatcher.demand))
        self.client_auth = ClientAuth(api_keys, cluster_token(),
                                      on_allowed=lambda label: self.metrics.api_key_requests.labels(label).inc())
        # What both APIs stream from: the dispatcher, resumed elsewhere when a worker dies mid-request.
        self.requests = Redispatcher(self.dispatcher, max_redispatches=max_redispatches,
                                     on_redispatch=lambda reason: self.metrics.redispatches.labels(reason).inc())
        # Output-length prediction, queue order and SLO admission around every request (router/request/sched.py).
        self.sched = RequestScheduling(self._prefill_rate, queue_policy=queue_policy, aging_s=queue_aging_s,
                                       admission=admission, slo_ttft_s=(role_policy or RolePolicyConfig()).ttft_slo_s,
                                       max_queued=max_queued_requests, max_queue_wait_s=max_queue_wait_s)
        load_warm_start(self.sched.predictor, predictor_warm_start)
        self.metrics.registry.register(SchedulingCollector(self.sched))
        self.requests = ScheduledRequests(self.sched, self.requests)
        self.pools = pools
        self.roles = RoleSwitcher(self.registry, self.pool, role_policy or RolePolicyConfig(), leader=self.leader,
                                  enabled=pools == "adaptive",
                                  on_switch=lambda old, new: self.metrics.role_switches.labels(old, new).inc())
        # OpenAI-compatible API and /metrics over HTTP (router/http_frontends.py); both off when None.
        self.http = HttpFrontends(self, model, host=host, http_port=http_port, metrics_port=metrics_port,
                                  http_host=http_host)
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address = ""

    def _prefill_rate(self) -> float | None:
        """The fastest measured prefill rate (prompt tokens/s) among serving instances that prefill."""
        return fastest_prefill_rate(r for r in self.registry.all() if r.state == WorkerState.SERVING
                                    and worker_pb2.ROLE_DECODE not in (r.role, r.home_role))

    async def start(self) -> str:
        await self.registry.start()
        if self.prefix_follower is not None:
            await self.prefix_follower.start()
        await self.leader.start()
        self.rescheduler.start()
        self.roles.start()
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS + SERVER_BACKLOG_OPTIONS, interceptors=self.client_auth.grpc_interceptors() or None)
        serving_pb2_grpc.add_ServingServicer_to_server(ServingServicer(self), self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port(f"{self.host}:{self.port}")
        if port == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}; choose another --port")
        self.address = f"{self.host}:{port}"
        await self.server.start()
        for service in ("", "tandem.v1.Serving"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("router serving %s on %s", self.model.model_id, self.address)
        await self.http.start()
        return self.address

    def _instances_changed(self, view: dict) -> None:
        """The registry's view changed: close channels to workers that left, and keep an Outputs
        stream open to each registered one (router/request/outputs_hub.py)."""
        live = {r.address for r in view.values()}
        self.pool.forget(live)
        self.dispatcher.outputs.watch(live)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.http.stop()
        await self.rescheduler.stop()
        await self.roles.stop()
        await self.leader.stop()
        if self.server:
            await self.server.stop(grace_s)
        await self.dispatcher.outputs.close()
        await self.pool.close()
        if self.prefix_follower is not None:
            await self.prefix_follower.stop()
        await self.registry.stop()


async def serve(router: Router) -> None:
    """Run until SIGTERM/SIGINT; prints `ready <address>` once serving (then ` http=HOST:PORT` and
    ` metrics=HOST:PORT` for the HTTP listeners that are on)."""
    address = await router.start()
    print(f"ready {address}{router.http.ready_suffix()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await router.stop()
