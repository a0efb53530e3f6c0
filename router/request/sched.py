"""What the router decides about a request before it runs, and learns after: output-length
prediction, the queue order it carries to the engines, and SLO-aware admission.

Both front doors wrap the dispatcher's stream with it (one code path):

    stream = router.metrics.track(rr, router.sched.run(rr, router.dispatcher.generate(rr)), api)

`run` predicts the output length (router/request/output_predictor.py) and writes the median into the
worker request (the engines' sjf order reads it), refuses at once a request that finds
`--max-queued-requests` admitted requests still without a first token, or a queue that holds more
than `--max-queue-wait-s` of starts at the measured start rate (RESOURCE_EXHAUSTED / 429 naming
the flag, retry-after: the excess at the measured start rate; whatever the admission mode, so the
router's queue and memory stay bounded under any burst and the backlog a burst leaves drains within
that wait), refuses what cannot meet its TTFT SLO
under `--admission slo` (router/request/admission.py: RouteError RESOURCE_EXHAUSTED with retry_after_s,
INVALID_ARGUMENT for an SLO no instance can meet), then yields the dispatcher's messages
unchanged (a resumed request, GenerateRequest.resume, skips admission and the queue count: it was
admitted by the router that died, and runs already), timing first tokens for the start rate, and finally teaches the predictor the number
of tokens the request produced. A request the client closed after some tokens counts with what
it received: that is the work it cost (as a chat UI that stops reading ends the answer there).
Errors teach nothing.

For one asyncio event loop (the router's); not thread-safe.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.request.admission import (DEFAULT_ADMISSION, DEFAULT_MAX_QUEUE_WAIT_S, DEFAULT_MAX_QUEUED, StartRate,
                                      predicted_ttft_s, queue_retry_after_s, retry_after_s)
from router.request.dispatch import RouteError, RoutedRequest
from router.request.output_predictor import OutputPredictor, PredictionError, Quantiles
from services.engine.queue_order import DEFAULT_AGING_S, DEFAULT_QUEUE_POLICY, order_key
from tandem.v1 import serving_pb2

log = logging.getLogger("tandem.router.sched")


class RequestScheduling:
    """prefill_rate() → the fastest measured prefill rate (prompt tokens/s) of a serving instance,
    or None while none has measured one."""

    def __init__(self, prefill_rate: Callable[[], float | None], *, queue_policy: str = DEFAULT_QUEUE_POLICY,
                 aging_s: float = DEFAULT_AGING_S, admission: str = DEFAULT_ADMISSION, slo_ttft_s: float = 2.0,
                 predictor: OutputPredictor | None = None, max_queued: int = DEFAULT_MAX_QUEUED,
                 max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S):
        if max_queued < 1:
            raise ValueError(f"--max-queued-requests {max_queued}: give at least 1")
        if not max_queue_wait_s >= 0:
            raise ValueError(f"--max-queue-wait-s {max_queue_wait_s}: give seconds >= 0 (0: no bound)")
        self.prefill_rate, self.max_queued, self.max_queue_wait_s = prefill_rate, max_queued, max_queue_wait_s
        self.queue_policy, self.aging_s, self.admission, self.slo_ttft_s = queue_policy, aging_s, admission, slo_ttft_s
        self.predictor = predictor or OutputPredictor()
        self.error = PredictionError()
        self.start_rate = StartRate()
        self.not_started: dict[str, RoutedRequest] = {}     # admitted, no first token yet
        self.refused: collections.Counter = collections.Counter()     # reason → requests refused
        self.sources: collections.Counter = collections.Counter()     # predictor source → predictions

    # ---- before dispatch ---------------------------------------------------------------------
    def ahead(self, rr: RoutedRequest, now: float) -> int:
        """Admitted requests without a first token that the queue policy serves before rr."""
        def key(x: RoutedRequest) -> tuple:
            priority, arrival, work = x.order_fields()
            return order_key(self.queue_policy, priority=priority, arrival=arrival, work=work, now=now,
                             aging_s=self.aging_s)
        mine = key(rr)
        return sum(1 for x in self.not_started.values() if x is not rr and key(x) < mine)

    def predict(self, rr: RoutedRequest) -> Quantiles:
        q = self.predictor.predict(rr.prompt_token_ids, rr.params.max_tokens, rr.expected_output_tokens)
        rr.predicted_output_tokens = q.p50
        rr.worker_request.predicted_output_tokens = max(1, round(q.p50))
        self.sources[q.source] += 1
        return q

    def admit(self, rr: RoutedRequest, now: float | None = None) -> None:
        """Raises RouteError when the queue bound or --admission slo refuses rr (see module
        docstring); else a no-op."""
        queued = len(self.not_started)
        if queued >= self.max_queued:
            self.refused["queue_full"] += 1
            wait = queue_retry_after_s(queued - self.max_queued + 1, self.start_rate.rate())
            error = RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the router's queue is full: {queued} requests wait for their first token "
                               f"(--max-queued-requests {self.max_queued}); retry after {wait} s, or add "
                               f"instances, or raise --max-queued-requests on the router")
            error.retry_after_s = wait
            raise error
        start_rate = self.start_rate.rate()
        if self.max_queue_wait_s and start_rate and queued / start_rate > self.max_queue_wait_s:
            self.refused["queue_wait"] += 1
            wait = queue_retry_after_s(queued - int(self.max_queue_wait_s * start_rate), start_rate)
            error = RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the router's queue holds {queued / start_rate:.1f} s of work ({queued} requests wait "
                               f"for their first token, {start_rate:.2g} start per second), over --max-queue-wait-s "
                               f"{self.max_queue_wait_s:g}; retry after {wait} s, or add instances, or raise "
                               f"--max-queue-wait-s on the router (0: no bound)")
            error.retry_after_s = wait
            raise error
        if self.admission != "slo":
            return
        now = time.monotonic() if now is None else now
        slo = rr.slo_ttft_s or self.slo_ttft_s
        rate = self.prefill_rate()
        own = predicted_ttft_s(0, None, len(rr.prompt_token_ids), rate)
        if own > slo:
            raise RouteError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"slo.ttft_s: {slo:g} s cannot be met by any instance: this prompt's prefill alone takes "
                             f"{own:.3f} s at the fastest measured rate ({rate:.0f} tokens/s); give slo.ttft_s of at "
                             f"least {own:.3f} or a shorter prompt")
        predicted = predicted_ttft_s(self.ahead(rr, now), self.start_rate.rate(), len(rr.prompt_token_ids), rate)
        if predicted > slo:
            self.refused["slo"] += 1
            error = RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the cluster cannot meet this request's TTFT SLO of {slo:g} s now (predicted "
                               f"{predicted:.2f} s behind {len(self.not_started)} queued requests); retry after "
                               f"{retry_after_s(predicted, slo)} s or give a larger slo.ttft_s")
            error.retry_after_s = retry_after_s(predicted, slo)
            raise error

    # ---- the stream ----------------------------------------------------------------------------
    async def run(self, rr: RoutedRequest,
                  stream: AsyncIterator[serving_pb2.GenerateResponse]) -> AsyncIterator[serving_pb2.GenerateResponse]:
        """Yield `stream`'s messages unchanged after prediction and admission (module docstring).
        Closes `stream` when closed itself, and when admission refuses (it never started)."""
        resumed = rr.resume_token_ids is not None
        try:
            predicted = self.predict(rr)
            if not resumed:          # admitted before its router died: it runs already, refusing it loses work
                self.admit(rr)
        except BaseException:
            await stream.aclose()
            raise
        if not resumed:
            self.not_started[rr.request_id] = rr
        tokens, learn = len(rr.resume_token_ids or ()), False     # it produced what the client has, too
        try:
            async for message in stream:
                if message.token_ids and rr.request_id in self.not_started:
                    del self.not_started[rr.request_id]
                    self.start_rate.started(time.monotonic(), len(self.not_started))
                tokens += len(message.token_ids)
                if message.finished:
                    learn = message.finish_reason != serving_pb2.FINISH_REASON_ABORT
                yield message
        except (GeneratorExit, asyncio.CancelledError):
            learn = not rr.aborted        # the client stopped reading (closed the stream, went away)
            raise
        finally:
            self.not_started.pop(rr.request_id, None)
            await _close(stream)
            if learn and tokens > 0:
                self.predictor.observe(rr.prompt_token_ids, rr.params.max_tokens, tokens, rr.expected_output_tokens)
                self.error.add(predicted, tokens)


async def _close(stream) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class SchedulingCollector:
    """`tandem_predictor_*` and `tandem_admission_*` metrics of one RequestScheduling, read at scrape."""

    def __init__(self, sched: RequestScheduling):
        self.sched = sched

    def describe(self):
        return []

    def collect(self):
        s = self.sched
        for name, doc, value in (
                ("tandem_predictor_mae_tokens", "Mean absolute error of the predicted median output length over "
                 "the last completed requests (tokens)", s.error.mae()),
                ("tandem_predictor_spearman", "Spearman rank correlation of predicted median vs actual output "
                 "length over the last completed requests (1: perfect order)", s.error.spearman()),
                ("tandem_predictor_interval_coverage", "Share of the last completed requests whose output length "
                 "fell inside the predicted [p10, p90]", s.error.coverage()),
                ("tandem_predictor_window_requests", "Completed requests the predictor error is measured over",
                 len(s.error)),
                ("tandem_router_unstarted_requests", "Admitted requests without a first token yet",
                 len(s.not_started)),
                ("tandem_admission_start_rate", "Measured first tokens per second while others wait (0: unknown)",
                 s.start_rate.rate() or 0.0)):
            yield GaugeMetricFamily(name, doc, value=value)
        observed = CounterMetricFamily("tandem_predictor_observations", "Completed requests the predictor learned from")
        observed.add_metric([], s.predictor.observations)
        yield observed
        sources = CounterMetricFamily("tandem_predictor_predictions", "Predictions by the feature that gave them",
                                      labels=["source"])
        for source in ("hint", "similar", "prefix", "length", "global", "prior"):
            sources.add_metric([source], s.sources[source])
        yield sources
        refused = CounterMetricFamily("tandem_admission_refused", "Requests refused at once (RESOURCE_EXHAUSTED / "
                                      "HTTP 429 with retry-after): slo (SLO-aware admission), queue_full "
                                      "(--max-queued-requests), queue_wait (--max-queue-wait-s)", labels=["reason"])
        for reason in ("slo", "queue_full", "queue_wait"):
            refused.add_metric([reason], s.refused[reason])
        yield refused


class ScheduledRequests:
    """`inner` (anything with generate(rr), e.g. the Redispatcher) with every request run through
    `sched.run`: what both front doors stream from."""

    def __init__(self, sched: RequestScheduling, inner):
        self.sched, self.inner = sched, inner

    def generate(self, rr: RoutedRequest) -> AsyncIterator[serving_pb2.GenerateResponse]:
        return self.sched.run(rr, self.inner.generate(rr))


def load_warm_start(predictor: OutputPredictor, path: str | None) -> int:
    """Teach `predictor` the JSONL file at `path` (None: nothing). Raises ValueError naming the flag,
    file and line of a bad one (OSError for an unreadable file, as open raises it)."""
    if not path:
        return 0
    with open(path, encoding="utf-8") as f:
        used = predictor.warm_start(f, source=f"--predictor-warm-start {path}")
    log.info("output-length predictor warm-started from %s (%d requests)", path, used)
    return used
