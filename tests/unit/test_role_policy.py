"""Adaptive pools' switch decisions, on hand-made load reports (no cluster, no clock)."""
from __future__ import annotations

from router.cluster.role_policy import BOTH, DECODE, PREFILL, RolePolicyConfig, decide, mixed_tokens
from tandem.v1 import worker_pb2

C = RolePolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, dwell_s=2.0)
HOME = {"p": PREFILL, "d": DECODE}


def load(iid, role, *, queued=0, rate=2000.0, step_ms=10.0, running=4, free=900, total=1000, state="serving"):
    return worker_pb2.LoadReport(instance_id=iid, role=role, queued_prefill_tokens=queued, prefill_tokens_per_s=rate,
                                 step_time_ms=step_ms, running=running, free_blocks=free, total_blocks=total,
                                 state=state)


def test_steady_cluster_switches_nothing():
    assert decide([load("p", PREFILL), load("d", DECODE)], HOME, {}, 100.0, C) is None


def test_prefill_pressure_moves_decode_instance_with_headroom_to_both():
    d = decide([load("p", PREFILL, queued=1000), load("d", DECODE, step_ms=10.0)], HOME, {}, 100.0, C)
    assert d.instance_id == "d" and d.role == BOTH
    # room: 0.8 * 50 ms - 10 ms = 30 ms at 2000 tok/s = 60 tokens, over 8 steps: 480 tokens a step
    assert d.mixed_prefill_tokens == 480 == mixed_tokens(load("d", DECODE, step_ms=10.0), C)
    assert mixed_tokens(load("d", DECODE, step_ms=39.5), C) == 16       # 0.5 ms of room: the floor


def test_prefill_pressure_without_decode_headroom_switches_nothing():
    loads = [load("p", PREFILL, queued=1000), load("d", DECODE, step_ms=35.0)]     # 35 ms > 0.6 * 50 ms
    assert decide(loads, HOME, {}, 100.0, C) is None


def test_decode_pressure_moves_idle_prefill_instance_to_both():
    d = decide([load("p", PREFILL, queued=0), load("d", DECODE, step_ms=48.0)], HOME, {}, 100.0, C)
    assert (d.instance_id, d.role) == ("p", BOTH)
    assert d.mixed_prefill_tokens == 0          # its home phase is prefill: its prompts are never capped


def test_full_kv_is_decode_pressure():
    d = decide([load("p", PREFILL), load("d", DECODE, free=50)], HOME, {}, 100.0, C)
    assert (d.instance_id, d.role) == ("p", BOTH)


def test_busy_prefill_instance_does_not_take_decodes():
    assert decide([load("p", PREFILL, queued=500), load("d", DECODE, step_ms=48.0)], HOME, {}, 100.0, C) is None


def test_both_goes_home_when_pressure_is_gone():
    d = decide([load("p", PREFILL), load("d", BOTH, queued=0)], HOME, {}, 100.0, C)
    assert (d.instance_id, d.role, d.mixed_prefill_tokens) == ("d", DECODE, 0)
    d = decide([load("p", BOTH), load("d", DECODE, step_ms=10.0)], HOME, {}, 100.0, C)
    assert (d.instance_id, d.role) == ("p", PREFILL)


def test_decode_instance_in_both_goes_home_when_its_decodes_suffer():
    d = decide([load("p", PREFILL, queued=5000), load("d", BOTH, step_ms=49.0)], HOME, {}, 100.0, C)
    assert (d.instance_id, d.role) == ("d", DECODE) and "decode pressure" in d.reason


def test_dwell_time_blocks_flapping():
    loads = [load("p", PREFILL, queued=1000), load("d", DECODE)]
    assert decide(loads, HOME, {"d": 99.0}, 100.0, C) is None
    assert decide(loads, HOME, {"d": 98.0}, 100.0, C).instance_id == "d"


def test_draining_and_unknown_instances_are_never_switched():
    loads = [load("p", PREFILL, queued=1000), load("d", DECODE, state="draining")]
    assert decide(loads, HOME, {}, 100.0, C) is None
    assert decide([load("p", PREFILL, queued=1000), load("x", DECODE)], HOME, {}, 100.0, C) is None


def test_unmeasured_rate_falls_back_to_the_placement_default():
    d = decide([load("p", PREFILL, queued=5000, rate=0.0), load("d", DECODE, rate=0.0)], HOME, {}, 100.0, C)
    assert d.role == BOTH and d.mixed_prefill_tokens == 240    # 30 ms at 1000 tok/s, over 8 steps
