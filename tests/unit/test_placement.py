"""Placement: freeness, decode/prefill/colocated choice, the in-flight ledger."""
from __future__ import annotations

import random

import pytest

from router.prefill_rate import DEFAULT_PREFILL_TOKENS_PER_S
from router.request.placement import (InflightLedger, InflightLoad, freeness, pick_colocated, pick_decode,
                                      pick_prefill, predicted_ttft_s)
from tandem.v1 import worker_pb2

DECODE, PREFILL = worker_pb2.ROLE_DECODE, worker_pb2.ROLE_PREFILL
COLOCATED = worker_pb2.ROLE_COLOCATED


def rep(instance_id, role=DECODE, free=0, running=0, waiting=0, state="serving", queued=0,
        rate=0.0):
    return worker_pb2.LoadReport(instance_id=instance_id, role=role, state=state,
                                 total_blocks=1000, free_blocks=free, running=running,
                                 waiting=waiting, queued_prefill_tokens=queued,
                                 prefill_tokens_per_s=rate)


def iid(report):
    return None if report is None else report.instance_id


def test_freeness_is_free_blocks_per_request():
    r = rep("d0", free=100, running=3, waiting=1)
    assert freeness(r) == 25.0
    assert freeness(r, extra_running=1) == 20.0
    assert freeness(r, extra_blocks=40) == 15.0
    assert freeness(rep("idle", free=7)) == 7.0                       # no requests: divide by 1
    assert freeness(rep("over", free=2, running=1), extra_blocks=6) == -4.0


def test_pick_decode_takes_the_freest_that_fits():
    reports = [rep("a", free=100, running=4),          # 25
               rep("b", free=60, running=1),           # 60, the freest
               rep("c", free=300, running=10)]         # 30
    ledger = InflightLedger()
    assert iid(pick_decode(reports, 10, ledger)) == "b"
    assert iid(pick_decode(reports, 61, ledger)) == "c"   # b is freest but lacks the blocks
    assert iid(pick_decode(reports, 300, ledger)) == "c"  # exactly enough fits
    assert pick_decode(reports, 301, ledger) is None
    assert pick_decode([], 1, ledger) is None


def test_pick_decode_skips_other_roles_and_states():
    reports = [rep("p", role=PREFILL, free=999), rep("x", role=COLOCATED, free=999),
               rep("u", role=worker_pb2.ROLE_UNSPECIFIED, free=999),
               rep("dr", free=999, state="draining"), rep("st", free=999, state="starting"),
               rep("ok", free=10, running=5)]
    assert iid(pick_decode(reports, 1, InflightLedger())) == "ok"
    assert pick_decode(reports[:-1], 1, InflightLedger()) is None


def test_pick_decode_counts_in_flight_reservations():
    reports = [rep("a", free=100), rep("b", free=90)]
    ledger = InflightLedger()
    token = ledger.add("a", blocks=20, running=1)       # a: 80 / 1 + 1 = 40 < b: 90
    assert iid(pick_decode(reports, 10, ledger)) == "b"
    assert iid(pick_decode(reports, 85, ledger)) == "b"  # a has 80 left after the reservation
    assert pick_decode(reports, 95, ledger) is None
    ledger.remove(token)
    assert iid(pick_decode(reports, 10, ledger)) == "a"


def test_pick_colocated_uses_the_colocated_pool_by_freeness():
    reports = [rep("d", free=999), rep("c1", role=COLOCATED, free=50, running=1),
               rep("c2", role=COLOCATED, free=90, running=2)]
    ledger = InflightLedger()
    assert iid(pick_colocated(reports, 5, ledger)) == "c1"
    assert iid(pick_colocated(reports, 60, ledger)) == "c2"
    assert pick_colocated(reports, 100, ledger) is None


def test_ties_go_to_the_smallest_instance_id():
    reports = [rep("d2", free=10), rep("d10", free=10), rep("d1", free=20, running=1)]
    for order in (reports, reports[::-1]):
        assert iid(pick_decode(order, 1, InflightLedger())) == "d1"
    prefills = [rep("p9", role=PREFILL, queued=100), rep("p3", role=PREFILL, queued=100)]
    for order in (prefills, prefills[::-1]):
        assert iid(pick_prefill(order, 10, InflightLedger())) == "p3"


def test_predicted_ttft_counts_queue_in_flight_and_prompt():
    r = rep("p0", role=PREFILL, queued=3000, rate=2000.0)
    ledger = InflightLedger()
    assert predicted_ttft_s(r, 1000, ledger) == 2.0
    ledger.add("p0", prompt_tokens=2000)
    ledger.add("elsewhere", prompt_tokens=10_000)
    assert predicted_ttft_s(r, 1000, ledger) == 3.0
    unmeasured = rep("p1", role=PREFILL, queued=500, rate=0.0)
    assert predicted_ttft_s(unmeasured, 500, ledger) == 1000 / DEFAULT_PREFILL_TOKENS_PER_S


def test_pick_prefill_takes_the_least_predicted_ttft():
    reports = [rep("slow", role=PREFILL, queued=0, rate=100.0),        # 1000/100 = 10 s
               rep("busy", role=PREFILL, queued=8000, rate=4000.0),    # 9000/4000 = 2.25 s
               rep("fast", role=PREFILL, queued=4000, rate=4000.0),    # 5000/4000 = 1.25 s
               rep("gone", role=PREFILL, state="stopping", rate=1e9),
               rep("dec", role=DECODE, rate=1e9)]
    assert iid(pick_prefill(reports, 1000, InflightLedger())) == "fast"
    assert pick_prefill(reports[3:], 1000, InflightLedger()) is None


def test_ledger_spreads_a_burst_between_two_polls():
    prefills = [rep(f"p{i}", role=PREFILL, rate=1000.0) for i in range(3)]
    decodes = [rep(f"d{i}", free=100) for i in range(3)]
    ledger = InflightLedger()
    placed_p, placed_d, tokens = [], [], []
    for _ in range(6):                                   # six equal requests, no new reports
        p = pick_prefill(prefills, 500, ledger)
        d = pick_decode(decodes, 10, ledger)
        tokens += [ledger.add(p.instance_id, prompt_tokens=500),
                   ledger.add(d.instance_id, blocks=10, running=1)]
        placed_p.append(p.instance_id)
        placed_d.append(d.instance_id)
    assert placed_p == ["p0", "p1", "p2", "p0", "p1", "p2"]
    assert placed_d == ["d0", "d1", "d2", "d0", "d1", "d2"]
    assert ledger.for_instance("d1") == InflightLoad(blocks=20, running=2)
    ledger.check_integrity()
    for token in tokens:
        ledger.remove(token)
    assert len(ledger) == 0 and ledger.for_instance("d1") == InflightLoad()
    ledger.check_integrity()


def test_ledger_remove_is_idempotent():
    ledger = InflightLedger()
    a = ledger.add("d0", blocks=3, prompt_tokens=7, running=1)
    b = ledger.add("d0", blocks=2)
    assert a != b
    ledger.remove(a)
    ledger.remove(a)
    ledger.remove(12345)
    assert ledger.for_instance("d0") == InflightLoad(blocks=2)
    assert ledger.for_instance("nobody") == InflightLoad()
    ledger.check_integrity()
    ledger._totals["d0"] = InflightLoad(blocks=99)       # corrupt it: the check must notice
    with pytest.raises(AssertionError, match="ledger totals"):
        ledger.check_integrity()


def test_pick_decode_always_takes_a_maximally_free_eligible_instance():
    rng = random.Random(1234)
    for trial in range(300):
        reports = [rep(f"d{i}", role=rng.choice([DECODE, DECODE, DECODE, PREFILL]),
                       state=rng.choice(["serving", "serving", "serving", "draining"]),
                       free=rng.randrange(0, 64), running=rng.randrange(0, 6),
                       waiting=rng.randrange(0, 3))
                   for i in range(rng.randrange(0, 9))]
        ledger = InflightLedger()
        for _ in range(rng.randrange(0, 5)):
            ledger.add(f"d{rng.randrange(0, 9)}", blocks=rng.randrange(0, 16),
                       running=rng.randrange(0, 2))
        need = rng.randrange(0, 24)

        def load(r):
            return ledger.for_instance(r.instance_id)

        eligible = [r for r in reports if r.role == DECODE and r.state == "serving"
                    and r.free_blocks - load(r).blocks >= need]
        chosen = pick_decode(reports, need, ledger)
        if not eligible:
            assert chosen is None, trial
            continue
        assert chosen in eligible, trial
        score = freeness(chosen, load(chosen).running, load(chosen).blocks)
        assert all(score >= freeness(r, load(r).running, load(r).blocks) for r in eligible), trial
        assert chosen == pick_decode(list(reversed(reports)), need, ledger), trial


def test_a_decode_instance_at_its_engines_seq_cap_takes_no_new_request():
    """Its report's running + waiting + leases (+ placements it does not show yet), or this router's
    own live requests there, reaching max_num_seqs: the request waits in the router's queue."""
    full = rep("full", free=900, running=6, waiting=1)
    full.max_num_seqs, full.leases = 8, 1
    other = rep("other", free=20, running=2)
    other.max_num_seqs = 8
    ledger = InflightLedger()
    assert iid(pick_decode([full, other], 1, ledger)) == "other"      # full is freer, but at its cap
    assert pick_decode([full], 1, ledger) is None
    full.leases = 0
    assert iid(pick_decode([full], 1, ledger)) == "full"               # 7 of 8
    token = ledger.add("full", blocks=1, running=1)
    assert pick_decode([full], 1, ledger) is None                      # placed since its report
    ledger.remove(token)
    stale = rep("stale", free=900)                                     # an old report: nothing runs
    stale.max_num_seqs = 2
    held = [ledger.hold("stale"), ledger.hold("stale")]
    assert pick_decode([stale], 1, ledger) is None                     # but two of ours live there
    ledger.let_go(held[0])
    ledger.let_go(held[0])                                             # idempotent
    assert ledger.held("stale") == 1 and iid(pick_decode([stale], 1, ledger)) == "stale"
    assert iid(pick_colocated([rep("c", role=COLOCATED, free=50, running=500)], 1, ledger)) == "c"   # no cap known
