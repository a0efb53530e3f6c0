"""The router's TTFT breakdown adds up: router queue + engine queue + prefill + transfer + path =
TTFT at the router, path being the rest (router/request/dispatch.py _time_first_token), on a fixed clock."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import router.request.dispatch as dispatch
from tandem.v1 import serving_pb2


def _stamp(monkeypatch, now: float, arrival: float, dispatched: float | None, **worker_parts):
    monkeypatch.setattr(dispatch.time, "monotonic", lambda: now)
    breakdown = serving_pb2.TtftBreakdown(**worker_parts)
    dispatch._time_first_token(SimpleNamespace(arrival=arrival, dispatched=dispatched), breakdown)
    return breakdown


def test_the_parts_add_up_to_the_ttft(monkeypatch):
    b = _stamp(monkeypatch, now=12.0, arrival=10.0, dispatched=10.5, queue_s=0.2, prefill_s=1.0, transfer_s=0.1)
    assert (b.ttft_s, b.router_queue_s, b.path_s) == pytest.approx((2.0, 0.5, 0.2))
    assert b.router_queue_s + b.queue_s + b.prefill_s + b.transfer_s + b.path_s == pytest.approx(b.ttft_s)


def test_a_request_never_dispatched_spent_it_all_in_the_router_queue(monkeypatch):
    b = _stamp(monkeypatch, now=11.0, arrival=10.0, dispatched=None)
    assert (b.ttft_s, b.router_queue_s, b.path_s) == pytest.approx((1.0, 1.0, 0.0))


def test_worker_parts_over_the_ttft_leave_no_negative_path(monkeypatch):
    b = _stamp(monkeypatch, now=11.0, arrival=10.0, dispatched=10.0, prefill_s=1.5)
    assert b.path_s == 0.0
