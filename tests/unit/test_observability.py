"""Metrics and logs without a cluster: the worker's event API (migrations, leases, steps, transfers)
and scrape-time gauges, the router's request tracking by outcome, and structured log lines."""
from __future__ import annotations

import asyncio
import io
import json
import logging

import grpc
import pytest

from router.request.dispatch import RouteError
from router.metrics import RouterMetrics
from services import log_setup
from services.transport import TransferStats
from services.worker import metrics as wm
from services.worker.observed_sender import ObservedSender
from services.worker.request_context import request_id_of
from tandem.v1 import serving_pb2, worker_pb2


def sample(name: str, registry=None, **labels) -> float:
    return (registry or wm.REGISTRY).get_sample_value(name, labels) or 0.0


# ---- worker event API --------------------------------------------------------------------------
def test_migration_api_counts_per_instance():
    before = sample("tandem_migrations_started_total", instance="src-a")
    wm.migration_started("src-a")
    wm.migration_started("src-a")
    wm.migration_committed("src-a", downtime_s=0.02, stages=3)
    wm.migration_aborted("src-a", "destination_full")
    assert sample("tandem_migrations_started_total", instance="src-a") == before + 2
    assert sample("tandem_migrations_committed_total", instance="src-a") >= 1
    assert sample("tandem_migrations_aborted_total", instance="src-a", reason="destination_full") >= 1
    assert sample("tandem_migration_downtime_seconds_bucket", instance="src-a", le="0.025") >= 1
    assert sample("tandem_migration_stages_bucket", instance="src-a", le="3.0") >= 1
    assert sample("tandem_migration_stages_bucket", instance="src-a", le="2.0") == 0
    assert sample("tandem_migrations_started_total", instance="src-b") == 0      # another instance: apart


def test_migration_committed_refuses_nonsense():
    with pytest.raises(ValueError):
        wm.migration_committed("x", -1.0, 1)
    with pytest.raises(ValueError):
        wm.migration_committed("x", 0.1, 0)


def test_lease_expiry_and_engine_steps():
    wm.lease_expired("inst-l")
    assert sample("tandem_leases_expired_total", instance="inst-l") == 1
    observe = wm.step_observer("inst-s", "decode")
    observe(0.004, 0, 3)
    observe(0.030, 64, 0)
    assert sample("tandem_engine_step_seconds_count", instance="inst-s", role="decode") == 2
    assert sample("tandem_engine_step_seconds_bucket", instance="inst-s", role="decode", le="0.005") == 1
    assert sample("tandem_engine_tokens_total", instance="inst-s", role="decode", kind="prefill") == 64
    assert sample("tandem_engine_tokens_total", instance="inst-s", role="decode", kind="decode") == 3


def _snapshot(**over):
    report = dict(instance_id="inst-g", home_role=worker_pb2.ROLE_DECODE, state="serving", model="tiny",
                  kv_transport="tcp", dtype="float32", total_blocks=100, free_blocks=70, reserved_blocks=5,
                  running=3, waiting=2, queued_prefill_tokens=40, leases=1)
    report.update(over)
    return wm.WorkerSnapshot(worker_pb2.LoadReport(**report), kv_sent_bytes=0, kv_received_bytes=4096,
                             kv_received_transfers=2, kv_receive_refusals=1)


def test_gauges_are_read_at_scrape_time_and_untracked_workers_vanish():
    snap = {"value": _snapshot()}
    wm.track("inst-g", lambda: snap["value"])
    try:
        assert sample("tandem_kv_blocks_used", instance="inst-g", role="decode") == 30
        assert sample("tandem_kv_blocks_free", instance="inst-g", role="decode") == 70
        assert sample("tandem_kv_blocks_reserved", instance="inst-g", role="decode") == 5
        assert sample("tandem_engine_waiting_requests", instance="inst-g", role="decode") == 2
        assert sample("tandem_queued_prefill_tokens", instance="inst-g", role="decode") == 40
        assert sample("tandem_kv_transfer_bytes_total", instance="inst-g", direction="received") == 4096
        assert sample("tandem_kv_transfer_failures_total", instance="inst-g", direction="received") == 1
        assert sample("tandem_worker_state", instance="inst-g", role="decode", state="serving") == 1
        assert sample("tandem_worker_state", instance="inst-g", role="decode", state="draining") == 0
        assert sample("tandem_migrations_started_total", instance="inst-g") == 0     # exists before any event
        snap["value"] = _snapshot(free_blocks=100, state="draining")
        assert sample("tandem_kv_blocks_used", instance="inst-g", role="decode") == 0
        assert sample("tandem_worker_state", instance="inst-g", role="decode", state="draining") == 1
    finally:
        wm.untrack("inst-g")
    assert wm.REGISTRY.get_sample_value("tandem_kv_blocks_used", {"instance": "inst-g", "role": "decode"}) is None


class _FakeTransfer:
    def __init__(self, fail):
        self.fail, self.pushed, self.aborted = fail, [], None

    def push(self, *args):
        self.pushed.append(args)

    def commit(self, num_tokens, meta, timeout):
        if self.fail:
            raise RuntimeError("lost")
        return TransferStats("r", 1024, 0.003, 2)

    def abort(self, reason=""):
        self.aborted = reason


class _FakeSender:
    def __init__(self, fail=False):
        self.fail, self.closed = fail, False

    def open(self, request_id, address, kv):
        return _FakeTransfer(self.fail)

    def close(self):
        self.closed = True

    def stats(self):
        return {"bytes_sent": 1024}


def test_observed_sender_records_committed_windows_only():
    sender = ObservedSender(_FakeSender(), "inst-t")
    t = sender.open("r", "addr", None)
    t.push([1], 0, 0, 2)
    assert t.inner.pushed == [([1], 0, 0, 2)]
    assert t.commit(3, {}, 1.0).bytes == 1024
    assert sample("tandem_kv_transfer_window_seconds_count", instance="inst-t") == 1
    assert sample("tandem_kv_transfer_window_seconds_bucket", instance="inst-t", le="0.0025") == 0
    failing = ObservedSender(_FakeSender(fail=True), "inst-t").open("r", "addr", None)
    with pytest.raises(RuntimeError):
        failing.commit(3, {}, 1.0)
    failing.abort("why")
    assert failing.inner.aborted == "why"
    assert sample("tandem_kv_transfer_window_seconds_count", instance="inst-t") == 1
    assert sender.stats() == {"bytes_sent": 1024}
    sender.close()
    assert sender.inner.closed


def test_request_id_of_worker_messages():
    assert request_id_of(worker_pb2.ReserveRequest(request=worker_pb2.WorkerRequest(request_id="a"))) == "a"
    assert request_id_of(worker_pb2.PrefillRequest(request=worker_pb2.WorkerRequest(request_id="b"))) == "b"
    assert request_id_of(worker_pb2.DecodeRequest(request_id="c")) == "c"
    assert request_id_of(worker_pb2.WorkerRequest(request_id="d")) == "d"
    assert request_id_of(worker_pb2.StatsRequest()) is None


# ---- router request tracking ---------------------------------------------------------------------
class _RR:
    def __init__(self, rid="req-1", aborted=False):
        import time
        self.request_id, self.prompt_token_ids, self.arrival, self.aborted = rid, [1, 2, 3], time.monotonic(), aborted


def _messages(n, finish=serving_pb2.FINISH_REASON_LENGTH):
    for i in range(n):
        m = serving_pb2.GenerateResponse(index=i, token_ids=[10 + i])
        if i == n - 1:
            m.finished, m.finish_reason = True, finish
        yield m


async def _gen(items, error=None):
    for m in items:
        await asyncio.sleep(0)
        yield m
    if error is not None:
        raise error


def _drain(metrics, stream, rr, api="grpc", stop_after=None):
    async def go():
        got = []
        tracked = metrics.track(rr, stream, api)
        try:
            async for m in tracked:
                got.append(m)
                if stop_after is not None and len(got) == stop_after:
                    break
        finally:
            await tracked.aclose()
        return got
    return asyncio.run(go())


def test_track_counts_a_finished_request():
    m = RouterMetrics(lambda: [])
    got = _drain(m, _gen(_messages(4)), _RR())
    assert len(got) == 4
    r = m.registry
    assert sample("tandem_requests_total", r, api="grpc", outcome="finished") == 1
    assert sample("tandem_request_ttft_seconds_count", r, api="grpc") == 1
    assert sample("tandem_request_tpot_seconds_count", r, api="grpc") == 1
    assert sample("tandem_request_e2e_seconds_count", r, api="grpc") == 1
    assert sample("tandem_generation_tokens_total", r, api="grpc") == 4
    assert sample("tandem_prompt_tokens_total", r, api="grpc") == 3
    assert sample("tandem_requests_in_flight", r, api="grpc") == 0


def test_track_outcomes_for_errors_aborts_and_clients_that_leave():
    m = RouterMetrics(lambda: [])
    with pytest.raises(RouteError):
        _drain(m, _gen([], RouteError(grpc.StatusCode.UNAVAILABLE, "no instance")), _RR(), api="openai")
    with pytest.raises(asyncio.CancelledError):
        _drain(m, _gen(list(_messages(3))[:1], asyncio.CancelledError()), _RR(aborted=True))
    _drain(m, _gen(_messages(5)), _RR(), stop_after=2)
    _drain(m, _gen(_messages(2, serving_pb2.FINISH_REASON_ABORT)), _RR())
    r = m.registry
    assert sample("tandem_requests_total", r, api="openai", outcome="unavailable") == 1
    assert sample("tandem_requests_total", r, api="grpc", outcome="aborted") == 2
    assert sample("tandem_requests_total", r, api="grpc", outcome="cancelled") == 1
    assert sample("tandem_request_e2e_seconds_count", r, api="grpc") == 0       # only finished requests
    assert sample("tandem_requests_in_flight", r, api="grpc") == 0
    m.rejected("openai", "invalid_argument")
    assert sample("tandem_requests_total", r, api="openai", outcome="invalid_argument") == 1


def test_cluster_gauges_from_the_registry_view():
    reports = [worker_pb2.LoadReport(instance_id="p0", role=worker_pb2.ROLE_PREFILL, state="serving",
                                     total_blocks=10, free_blocks=8, queued_prefill_tokens=30),
               worker_pb2.LoadReport(instance_id="d0", role=worker_pb2.ROLE_DECODE, state="serving",
                                     total_blocks=20, free_blocks=5, running=4),
               worker_pb2.LoadReport(instance_id="d1", role=worker_pb2.ROLE_DECODE, state="draining")]
    m = RouterMetrics(lambda: reports)
    r = m.registry
    assert sample("tandem_instances", r, role="decode", state="serving") == 1
    assert sample("tandem_instances", r, role="decode", state="draining") == 1
    assert sample("tandem_instances", r, role="colocated", state="serving") == 0
    assert sample("tandem_cluster_kv_blocks_free", r, role="decode") == 5
    assert sample("tandem_cluster_running_requests", r, role="decode") == 4
    assert sample("tandem_cluster_queued_prefill_tokens", r, role="prefill") == 30
    # adaptive pools: a decode instance serving both roles for now still counts in the decode pool
    reports[1] = worker_pb2.LoadReport(instance_id="d0", role=worker_pb2.ROLE_COLOCATED,
                                       home_role=worker_pb2.ROLE_DECODE, state="serving", total_blocks=20,
                                       free_blocks=5, running=4)
    assert sample("tandem_instances", r, role="decode", state="serving") == 1
    assert sample("tandem_instances", r, role="colocated", state="serving") == 0
    assert sample("tandem_cluster_running_requests", r, role="decode") == 4


def test_router_queue_is_read_at_scrape_time():
    waiting = {"n": 3}
    m = RouterMetrics(lambda: [], queued=lambda: waiting["n"])
    assert sample("tandem_router_queued_requests", m.registry) == 3
    waiting["n"] = 0
    assert sample("tandem_router_queued_requests", m.registry) == 0


def test_two_routers_in_one_process_keep_separate_counts():
    a, b = RouterMetrics(lambda: []), RouterMetrics(lambda: [])
    a.rejected("grpc", "invalid_argument")
    assert sample("tandem_requests_total", b.registry, api="grpc", outcome="invalid_argument") == 0


# ---- logs ----------------------------------------------------------------------------------------
@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_lines_carry_the_request_id(restore_logging):
    out = io.StringIO()
    log_setup.configure("worker", "json", "debug", instance="decode-0", stream=out)
    log = logging.getLogger("tandem.test")
    log.info("outside")
    with log_setup.request_context("req-42"):
        log.debug("inside %d", 7, extra={"rpc": "Decode"})
        try:
            raise KeyError("boom")
        except KeyError:
            log.exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert "request_id" not in lines[0] and lines[0]["message"] == "outside"
    assert lines[1]["request_id"] == "req-42" and lines[1]["message"] == "inside 7" and lines[1]["rpc"] == "Decode"
    assert lines[1]["component"] == "worker" and lines[1]["instance"] == "decode-0" and lines[1]["level"] == "DEBUG"
    assert "KeyError" in lines[2]["exception"]


def test_text_lines_and_bad_flags(restore_logging):
    out = io.StringIO()
    log_setup.configure("router", "text", "info", stream=out)
    with log_setup.request_context("req-7"):
        logging.getLogger("tandem.x").info("hello")
    logging.getLogger("tandem.x").debug("hidden")
    assert "tandem.x [req-7]: hello" in out.getvalue() and "hidden" not in out.getvalue()
    with pytest.raises(ValueError, match="--log-format"):
        log_setup.configure("router", "xml")
    with pytest.raises(ValueError, match="--log-level"):
        log_setup.configure("router", "text", "loud")
