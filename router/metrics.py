"""The router's Prometheus metrics, all named `tandem_*`, and the wrapper that measures a request.

Registry: each RouterMetrics owns a CollectorRegistry, so several Router objects in one (test)
process keep separate counts and never clash on registration; the router's /metrics serves it.

Request metrics are measured where the router sees the stream (both APIs, one code path):

    async for message in router.metrics.track(rr, dispatcher.generate(rr), api="grpc"): ...

`track` binds the request id to the task's log lines, times TTFT (arrival → first token),
TPOT ((last token − first token) / (tokens − 1), for two tokens or more) and end to end, counts
the outcome and logs one line when the request ends. Outcomes (label `outcome`): `finished`
(stop or length), `aborted` (the Abort RPC), `cancelled` (the client went away or its deadline
passed), and for errors the lowercased gRPC status name (`invalid_argument`, `not_found`,
`already_exists`, `unavailable`, `resource_exhausted`, `deadline_exceeded`, `internal`, ...).
Label `api`: `grpc` or `openai`. `tandem_kv_fallbacks_total` counts the requests whose KV transfer
failed so that their decode instance was asked to recompute the prompt (RoutedRequest.kv_fallback),
whatever their outcome. The cluster gauges are read from the registry view at scrape.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily

from services.log_setup import bind_request_id
from services.roles import ROLE_LABELS, WORKER_STATES, pool_role, role_label
from tandem.v1 import serving_pb2, worker_pb2

prometheus_client.disable_created_metrics()
log = logging.getLogger("tandem.router.requests")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
                10.0, 20.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
APIS = ("grpc", "openai")
_FINISH_NAMES = {serving_pb2.FINISH_REASON_STOP: "stop", serving_pb2.FINISH_REASON_LENGTH: "length",
                 serving_pb2.FINISH_REASON_ABORT: "abort"}


class RouterMetrics:
    """Metrics of one router. `instances()` returns every LoadReport the router knows (any state);
    `queued()`, the requests waiting at the router for KV room on some instance."""

    def __init__(self, instances: Callable[[], Iterable[worker_pb2.LoadReport]],
                 queued: Callable[[], int] = lambda: 0):
        self.registry = reg = CollectorRegistry()
        ProcessCollector(namespace="tandem_router", registry=reg)
        self.requests = Counter("tandem_requests_total", "Requests by API and outcome", ["api", "outcome"],
                                registry=reg)
        self.in_flight = Gauge("tandem_requests_in_flight", "Requests the router is streaming now", ["api"],
                               registry=reg)
        Gauge("tandem_router_queued_requests", "Requests waiting at the router for KV room (every instance full)",
              registry=reg).set_function(queued)
        self.ttft = Histogram("tandem_request_ttft_seconds", "Time to first token, router arrival to first token",
                              ["api"], buckets=TTFT_BUCKETS, registry=reg)
        self.tpot = Histogram("tandem_request_tpot_seconds", "Time per output token after the first (per request)",
                              ["api"], buckets=TPOT_BUCKETS, registry=reg)
        self.e2e = Histogram("tandem_request_e2e_seconds", "Router arrival to the last message",
                             ["api"], buckets=E2E_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("tandem_prompt_tokens_total", "Prompt tokens of requests that started",
                                     ["api"], registry=reg)
        self.generation_tokens = Counter("tandem_generation_tokens_total", "Output tokens sent to clients",
                                         ["api"], registry=reg)
        self.role_switches = Counter("tandem_role_switches_total", "Role switches of adaptive pools applied by "
                                     "this router (colocated = prefill and decode)", ["from_role", "to_role"],
                                     registry=reg)
        self.kv_fallbacks = Counter("tandem_kv_fallbacks_total", "Requests whose KV transfer failed, so that "
                                    "the decode instance recomputed the prompt instead", ["api"], registry=reg)
        self.redispatches = Counter("tandem_redispatches_total", "Requests carried on elsewhere after the instance "
                                    "serving them was lost (router/request/redispatch.py), by reason", ["reason"],
                                    registry=reg)
        self.api_key_requests = Counter("tandem_api_key_requests_total", "Client calls accepted, by API key (its "
                                        "sha256 label, never the key; router/client_auth.py)", ["key"], registry=reg)
        for reason in ("decode_lost", "stream_ended", "heartbeat_missed"):
            self.redispatches.labels(reason)
        for api in APIS:            # series exist (at 0) before the first request
            for m in (self.in_flight, self.ttft, self.tpot, self.e2e, self.prompt_tokens, self.generation_tokens,
                      self.kv_fallbacks):
                m.labels(api)
            self.requests.labels(api, "finished")
        reg.register(_ClusterCollector(instances))

    def rejected(self, api: str, outcome: str) -> None:
        """Count a request refused before dispatch (e.g. `invalid_argument`, `not_found`)."""
        self.requests.labels(api, outcome).inc()

    async def track(self, rr, stream: AsyncIterator[serving_pb2.GenerateResponse],
                    api: str) -> AsyncIterator[serving_pb2.GenerateResponse]:
        """Yield `stream`'s messages unchanged while measuring the request (see module docstring).
        Closes `stream` when closed itself; re-raises whatever `stream` raises."""
        bind_request_id(rr.request_id)
        self.prompt_tokens.labels(api).inc(len(rr.prompt_token_ids))
        in_flight = self.in_flight.labels(api)
        generated = self.generation_tokens.labels(api)      # looked up once, not per message
        in_flight.inc()
        outcome, finish, tokens = "cancelled", None, 0
        t_first = t_last = None
        try:
            async with contextlib.aclosing(stream) as messages:
                async for message in messages:
                    if message.token_ids:
                        t_last = time.monotonic()
                        if t_first is None:
                            t_first = t_last
                            self.ttft.labels(api).observe(t_first - rr.arrival)
                        tokens += len(message.token_ids)
                        generated.inc(len(message.token_ids))
                    if message.finished:
                        finish = message.finish_reason
                        outcome = "aborted" if finish == serving_pb2.FINISH_REASON_ABORT else "finished"
                    yield message
        except asyncio.CancelledError:
            outcome = "aborted" if rr.aborted else "cancelled"
            raise
        except Exception as e:
            code = getattr(e, "code", None)
            outcome = code.name.lower() if code is not None and hasattr(code, "name") else "internal"
            raise
        finally:
            in_flight.dec()
            end = time.monotonic()
            self.requests.labels(api, outcome).inc()
            if getattr(rr, "kv_fallback", ""):
                self.kv_fallbacks.labels(api).inc()
            if outcome == "finished":
                self.e2e.labels(api).observe(end - rr.arrival)
                if tokens >= 2:
                    self.tpot.labels(api).observe((t_last - t_first) / (tokens - 1))
            log.info("request %s: %s, %d prompt + %d output tokens, ttft %s, e2e %.3fs", outcome,
                     _FINISH_NAMES.get(finish, "-"), len(rr.prompt_token_ids), tokens,
                     "-" if t_first is None else f"{t_first - rr.arrival:.3f}s", end - rr.arrival,
                     extra={"api": api, "outcome": outcome, "prompt_tokens": len(rr.prompt_token_ids),
                            "output_tokens": tokens, "finish_reason": _FINISH_NAMES.get(finish),
                            "ttft_s": None if t_first is None else round(t_first - rr.arrival, 6),
                            "e2e_s": round(end - rr.arrival, 6)})


class _ClusterCollector:
    """Instances by role and state, and the cluster's load by role, from the router's view."""

    def __init__(self, instances: Callable[[], Iterable[worker_pb2.LoadReport]]):
        self._instances = instances

    def describe(self):
        return []

    def collect(self):
        reports = list(self._instances())
        roles = list(ROLE_LABELS)
        count = GaugeMetricFamily("tandem_instances", "Instances the router knows, by pool role (the role each was "
                                  "started in: adaptive pools' switches show in tandem_role_switches_total) and state",
                                  labels=["role", "state"])
        states = list(WORKER_STATES) + sorted({r.state for r in reports} - set(WORKER_STATES))
        for role in roles:
            for state in states:
                count.add_metric([role, state], sum(1 for r in reports
                                                    if role_label(pool_role(r)) == role and r.state == state))
        yield count
        fields = (("tandem_cluster_kv_blocks_total", "KV blocks of every instance", "total_blocks"),
                  ("tandem_cluster_kv_blocks_free", "Free KV blocks of every instance", "free_blocks"),
                  ("tandem_cluster_running_requests", "Requests running on instances", "running"),
                  ("tandem_cluster_waiting_requests", "Requests queued on instances", "waiting"),
                  ("tandem_cluster_queued_prefill_tokens", "Prompt tokens queued for prefill", "queued_prefill_tokens"))
        for name, doc, field in fields:
            g = GaugeMetricFamily(name, doc + ", by pool role (from their last load reports)", labels=["role"])
            for role in roles:
                g.add_metric([role], sum(getattr(r, field) for r in reports if role_label(pool_role(r)) == role))
            yield g
