"""sjf's displacement (queue_order.displaces): with every batch slot taken, a much shorter waiting
request takes the slot of the running one with the most predicted work left; never under fcfs,
never a higher priority class, an aged request, or one displaced MAX_DISPLACEMENTS times."""
from __future__ import annotations

import time

from services.engine.config import SchedulerConfig
from services.engine.kv_cache import KVCacheManager
from services.engine.kv_compress import CompressedStore
from services.engine.queue_order import DISPLACE_RATIO, MAX_DISPLACEMENTS, displaces
from services.engine.scheduler import Scheduler
from tests.unit.test_scheduler import req, step


def test_displaces_is_a_margin_less_the_switch_cost():
    assert displaces(10, 10 * DISPLACE_RATIO + 1, 0)
    assert not displaces(10, 10 * DISPLACE_RATIO, 0)
    assert not displaces(10, 10 * DISPLACE_RATIO + 1, 2)         # recomputing the victim eats the margin
    assert displaces(0, 0.5, 0) and not displaces(0, 0, 0)


def _sched(policy: str = "sjf", mode: str = "recompute", slots: int = 2) -> Scheduler:
    kv = KVCacheManager(1024, 4, enable_prefix_caching=False)    # room for all: only slots are short
    return Scheduler(SchedulerConfig(policy=policy, max_num_seqs=slots, preemption_mode=mode), kv, 1024,
                     kv_store=CompressedStore(1 << 20, 100))


def _long_pair(s: Scheduler, now: float):
    a = req("a", 8, now - 2, max_tokens=300)
    b = req("b", 8, now - 1, max_tokens=300)
    a.predicted_output_tokens, b.predicted_output_tokens = 200, 100
    s.add(a)
    s.add(b)
    step(s)                  # both prefilled, decoding: every slot taken
    return a, b


def test_a_short_request_takes_the_slot_of_the_longest():
    s = _sched()
    a, b = _long_pair(s, time.monotonic())
    c = req("c", 8, time.monotonic(), max_tokens=300)
    c.predicted_output_tokens = 5
    s.add(c)
    out, _, shape = step(s)
    assert out.preempted == ["a"] and a.num_displaced == 1 and s.preemption.displaced == 1
    assert ("c", 8) in shape["prefills"] and ("b", 1) in shape["decodes"]
    assert a in s.waiting and c in s.running and len(s.running) == 2
    while s.num_unfinished:
        step(s)
    s.kv.check_integrity()


def test_compressed_victims_switch_for_free():
    s = _sched(mode="compress")
    a, b = _long_pair(s, time.monotonic())
    c = req("c", 8, time.monotonic(), max_tokens=300)
    c.predicted_output_tokens = 5
    s.add(c)
    out, _, _ = step(s)
    assert out.preempted == ["a"] and [x.request_id for x in out.kv_saves] == ["a"]
    while s.num_unfinished:
        step(s)
    assert s.preemption.restored == 1 and len(s.kv_store) == 0


def test_nothing_displaces_under_fcfs_or_for_a_not_much_shorter_request():
    s = _sched(policy="fcfs")
    _long_pair(s, time.monotonic())
    c = req("c", 8, time.monotonic(), max_tokens=5)
    s.add(c)
    out, _, _ = step(s)
    assert out.preempted == [] and c in s.waiting
    s = _sched()
    a, b = _long_pair(s, time.monotonic())
    c = req("c", 8, time.monotonic(), max_tokens=300)
    c.predicted_output_tokens = 60          # 60 x 4 > the 199 steps a has left
    s.add(c)
    out, _, _ = step(s)
    assert out.preempted == [] and c in s.waiting


def test_priority_age_and_the_displacement_limit_protect_a_request():
    now = time.monotonic()
    s = _sched()
    a, b = _long_pair(s, now)
    a.priority = b.priority = 1                # a higher class than the newcomer
    c = req("c", 8, now, max_tokens=300)
    c.predicted_output_tokens = 1
    s.add(c)
    assert step(s)[0].preempted == []
    s = _sched()
    a, b = _long_pair(s, now)
    a.arrival_time = b.arrival_time = now - 60     # aged: served by arrival now
    s.add(c := req("c", 8, now, max_tokens=300))
    c.predicted_output_tokens = 1
    assert step(s)[0].preempted == []
    s = _sched()
    a, b = _long_pair(s, now)
    a.num_displaced = b.num_displaced = MAX_DISPLACEMENTS
    s.add(c := req("c", 8, now, max_tokens=300))
    c.predicted_output_tokens = 1
    assert step(s)[0].preempted == []


def test_a_ratio_of_zero_never_displaces():
    kv = KVCacheManager(1024, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(policy="sjf", max_num_seqs=2, displace_ratio=0), kv, 1024)
    _long_pair(s, time.monotonic())
    c = req("c", 8, time.monotonic(), max_tokens=300)
    c.predicted_output_tokens = 1
    s.add(c)
    out, _, _ = step(s)
    assert out.preempted == [] and c in s.waiting and s.preemption.displaced == 0


def test_a_request_displaced_this_step_is_not_admitted_again_in_it():
    # Slots: a (decoding, long) and t (part way through prompt P). c, a twin of t (prompt P) and
    # short, displaces a, then waits for t's chunk as twins do: admission goes on past it and must
    # not take a back in the same step (its compressed copy is made only after schedule()).
    kv = KVCacheManager(1024, 4, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(policy="sjf", max_num_seqs=2, max_num_batched_tokens=64,
                                  long_prefill_token_threshold=8, preemption_mode="compress"), kv, 1024, kv_store=CompressedStore(1 << 20, 100))
    now = time.monotonic()
    a = req("a", 4, now - 2, max_tokens=300)
    a.predicted_output_tokens = 200
    s.add(a)
    step(s)                                   # a: prefilled, decoding
    t = req("t", 40, now - 1, max_tokens=300, base=5000)
    t.predicted_output_tokens = 200
    s.add(t)
    step(s)                                   # t: its first chunk of P
    c = req("c", 40, now, max_tokens=300, base=5000)
    c.predicted_output_tokens = 1
    s.add(c)
    out, _, shape = step(s)
    assert out.preempted == ["a"] and [x.request_id for x in out.kv_saves] == ["a"]
    assert not out.kv_restores and a in s.waiting and "a" not in [rid for rid, _ in shape["decodes"]]
    assert "a" in s.kv_store
    # (this harness gives followers no token, so the run is ended here rather than finished)
    from services.engine.request import FinishReason
    for rid in list(s.requests):
        s.finish(rid, FinishReason.ABORT)
    s.kv.check_integrity()
    assert len(s.kv_store) == 0 and s.kv.num_used_blocks == 0
