"""Adaptive pools' switch decisions, on hand-made load reports (no cluster, no clock)."""
from __future__ import annotations

from router.cluster.role_policy import BOTH, DECODE, PREFILL, RolePolicyConfig, decide, mixed_tokens
from tandem.v1 import worker_pb2

C = RolePolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, dwell_s=2.0, standing_share=False)
STANDING = RolePolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, dwell_s=2.0)
HOME = {"p": PREFILL, "d": DECODE}


def load(iid, role, *, queued=0, rate=2000.0, step_ms=10.0, decode_ms=0.0, running=4, free=900, total=1000,
         state="serving", cap=0):
    return worker_pb2.LoadReport(instance_id=iid, role=role, queued_prefill_tokens=queued, prefill_tokens_per_s=rate,
                                 step_time_ms=step_ms, decode_step_time_ms=decode_ms, running=running, free_blocks=free,
                                 total_blocks=total, state=state,
                                 mixed_prefill_tokens=cap)


def test_steady_cluster_switches_nothing():
    assert decide([load("p", PREFILL), load("d", DECODE)], HOME, {}, 100.0, C) is None


def test_standing_share_moves_decode_instance_with_headroom_to_both_without_pressure():
    assert STANDING.standing_share                     # the default
    d = decide([load("p", PREFILL), load("d", DECODE, step_ms=10.0)], HOME, {}, 100.0, STANDING)
    assert (d.instance_id, d.role, d.mixed_prefill_tokens) == ("d", BOTH, 240) and "standing" in d.reason
    # ... and stays there while its decodes keep their headroom, with or without prefill pressure
    assert decide([load("p", PREFILL), load("d", BOTH, step_ms=10.0)], HOME, {}, 100.0, STANDING) is None
    # no headroom: no share; decode pressure: home
    assert decide([load("p", PREFILL), load("d", DECODE, step_ms=35.0)], HOME, {}, 100.0, STANDING) is None
    d = decide([load("p", PREFILL, queued=500), load("d", BOTH, step_ms=49.0)], HOME, {}, 100.0, STANDING)
    assert (d.instance_id, d.role) == ("d", DECODE) and "decode pressure" in d.reason


def test_prefill_pressure_moves_decode_instance_with_headroom_to_both():
    d = decide([load("p", PREFILL, queued=1000), load("d", DECODE, step_ms=10.0)], HOME, {}, 100.0, C)
    assert d.instance_id == "d" and d.role == BOTH
    # room: 0.8 * 50 ms - 10 ms = 30 ms at 2000 tok/s = 60 tokens, over 4 steps: 240 tokens a step
    assert d.mixed_prefill_tokens == 240 == mixed_tokens(load("d", DECODE, step_ms=10.0), C)
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
    assert d.role == BOTH and d.mixed_prefill_tokens == 120    # 30 ms at 1000 tok/s, over 4 steps


def test_steps_lengthened_by_the_prompts_a_decode_instance_took_are_not_decode_pressure():
    # its mean step (49 ms) counts the prompt chunks beside its decodes; the batch alone takes 10 ms
    loads = [load("p", PREFILL), load("d", BOTH, step_ms=49.0, decode_ms=10.0)]
    assert decide(loads, HOME, {}, 100.0, STANDING) is None          # neither goes home nor calls p in
    # the batch alone past 0.85 x the TPOT SLO is: it goes home (p is busy, so it is the only move)
    loads = [load("p", PREFILL, queued=500), load("d", BOTH, step_ms=49.0, decode_ms=45.0)]
    assert (decide(loads, HOME, {}, 100.0, STANDING).role, ) == (DECODE, )
    # the share is sized from the batch's own step: 0.8 x 50 - 10 ms of room, as with a 10 ms mean step
    assert mixed_tokens(load("d", DECODE, step_ms=30.0, decode_ms=10.0), C) == 240


def test_a_standing_share_is_recapped_when_its_decode_batch_changes():
    # cap 240 was set at 10 ms decode steps; now they take 30 ms: 0.8 x 50 - 30 = 10 ms of room = 80 tokens
    d = decide([load("p", PREFILL), load("d", BOTH, decode_ms=30.0, cap=240)], HOME, {}, 100.0, STANDING)
    assert (d.instance_id, d.role, d.mixed_prefill_tokens) == ("d", BOTH, 80) and "re-cap" in d.reason
    # within RECAP_RATIO of what it would be now: left alone; within its dwell time: too
    assert decide([load("p", PREFILL), load("d", BOTH, decode_ms=30.0, cap=100)], HOME, {}, 100.0, STANDING) is None
    assert decide([load("p", PREFILL), load("d", BOTH, decode_ms=30.0, cap=240)], HOME, {"d": 99.0}, 100.0,
                  STANDING) is None
    # no decodes running: no cap applies, none is set (an empty batch's would be wrong at its first decode)
    assert decide([load("p", PREFILL), load("d", BOTH, decode_ms=30.0, cap=240, running=0)], HOME, {}, 100.0,
                  STANDING) is None
    # a switch that is due goes first
    d = decide([load("p", PREFILL, queued=500), load("d", BOTH, decode_ms=45.0, cap=240)], HOME, {}, 100.0, STANDING)
    assert d.role == DECODE
