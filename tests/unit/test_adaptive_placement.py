"""Adaptive pools' placement: when a switched instance serves a request whole (pure functions)."""
from __future__ import annotations

from router.request.placement import InflightLedger, mixed_prefill_rate, pick_whole_request
from tandem.v1 import worker_pb2

P, D, C = worker_pb2.ROLE_PREFILL, worker_pb2.ROLE_DECODE, worker_pb2.ROLE_COLOCATED


def rep(iid, role, home, *, queued=0, rate=1000.0, running=0, free=500, step_ms=10.0, cap=0, state="serving"):
    return worker_pb2.LoadReport(instance_id=iid, role=role, home_role=home, queued_prefill_tokens=queued,
                                 prefill_tokens_per_s=rate, running=running, free_blocks=free, total_blocks=1000,
                                 step_time_ms=step_ms, mixed_prefill_tokens=cap, state=state)


def test_fixed_pools_always_disaggregate():
    assert pick_whole_request([rep("p", P, P, queued=5000), rep("d", D, D)], 100, 7, InflightLedger()) is None


def test_switched_decode_instance_takes_requests_while_it_beats_the_prefill_queue():
    ledger = InflightLedger()
    p = rep("p", P, P, queued=2000)                          # 2.1 s until a 100-token prompt's first token
    # capped: 50 tokens a step of 12.5 ms decodes + 12.5 ms for the 50 tokens = 2000 tok/s
    d = rep("d", C, D, rate=4000.0, running=4, cap=50, step_ms=12.5)
    assert mixed_prefill_rate(d) == 2000.0
    assert pick_whole_request([p, d], 100, 7, ledger).instance_id == "d"
    ledger.add("d", prompt_tokens=5000)                      # its own queue now longer than P's
    assert pick_whole_request([p, d], 100, 7, ledger) is None


def test_switched_decode_instance_without_room_is_skipped():
    assert pick_whole_request([rep("p", P, P, queued=2000), rep("d", C, D, free=3)], 100, 7, InflightLedger()) is None


def test_switched_prefill_instance_takes_requests_while_its_decodes_are_lighter():
    p = rep("p", C, P, running=2)
    assert pick_whole_request([p, rep("d", D, D, running=30)], 100, 7, InflightLedger()).instance_id == "p"
    assert pick_whole_request([p, rep("d", D, D, running=2)], 100, 7, InflightLedger()) is None


def test_home_colocated_instances_are_not_switched_ones():
    assert pick_whole_request([rep("c", C, C)], 100, 7, InflightLedger()) is None


def test_a_switched_decode_instance_is_timed_by_its_decode_steps_when_it_reports_them():
    # 50 tokens a step beside a 12.5 ms decode batch, at 4000 tok/s: 2000 tok/s, whatever the mean step
    d = worker_pb2.LoadReport(instance_id="d", role=C, home_role=D, prefill_tokens_per_s=4000.0, running=4,
                              step_time_ms=40.0, decode_step_time_ms=12.5, mixed_prefill_tokens=50, state="serving")
    assert mixed_prefill_rate(d) == 2000.0
