"""services/engine/queue_order.py and the engine's sjf policy: exact orders, aging, and no starvation."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.policy import SjfPolicy, make_policy, predicted_work
from services.engine.queue_order import (FCFS, PROMPT_TOKEN_COST, SJF, check_policy, order_key, ordered, position,
                                         remaining_work)
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams


def fields(item):
    name, priority, arrival, work = item
    return priority, arrival, work


ITEMS = [("a", 0, 0.0, 50.0), ("b", 0, 1.0, 5.0), ("c", 1, 2.0, 80.0), ("d", 0, 3.0, 5.0), ("e", 0, 4.0, 1.0)]


def names(items):
    return [x[0] for x in items]


def test_fcfs_is_arrival_order():
    assert names(ordered(reversed(ITEMS), FCFS, now=5.0, fields=fields)) == ["a", "b", "c", "d", "e"]


def test_sjf_priority_class_first_then_least_work_ties_by_arrival():
    assert names(ordered(ITEMS, SJF, now=5.0, fields=fields, aging_s=100.0)) == ["c", "e", "b", "d", "a"]


def test_sjf_aged_requests_go_first_in_arrival_order():
    # now 12, aging 10: a (waited 12) and b (11) are aged; c has priority 1 and still leads.
    assert names(ordered(ITEMS, SJF, now=12.0, fields=fields, aging_s=10.0)) == ["c", "a", "b", "e", "d"]
    # aging reaches the priority class too: it only reorders within a class
    assert names(ordered(ITEMS, SJF, now=100.0, fields=fields, aging_s=10.0)) == ["c", "a", "b", "d", "e"]


def test_position_counts_those_served_first():
    assert position(ITEMS, ITEMS[0], SJF, 5.0, fields, aging_s=100.0) == 4
    assert position(ITEMS, ITEMS[0], FCFS, 5.0, fields) == 0
    assert position(ITEMS, ITEMS[2], SJF, 5.0, fields, aging_s=100.0) == 0


def test_remaining_work_counts_prompt_at_its_cost_and_never_goes_negative():
    assert remaining_work(320, 10) == pytest.approx(320 * PROMPT_TOKEN_COST + 10)
    assert remaining_work(0, 10, output_tokens_so_far=4) == 6
    assert remaining_work(0, 3, output_tokens_so_far=9) == 0
    assert order_key(FCFS, priority=5, arrival=1.5, work=9, now=2) == (1.5,)


def test_unknown_policy_names_the_flag():
    with pytest.raises(ValueError, match=r"--queue-policy 'lifo'.*fcfs, sjf"):
        check_policy("lifo")


def _req(rid, prompt, arrival, *, max_tokens=64, predicted=0, priority=0):
    return Request(rid, list(range(3, 3 + prompt)), SamplingParams(max_tokens=max_tokens), priority=priority,
                   arrival_time=arrival, predicted_output_tokens=predicted)


def test_engine_sjf_orders_by_predicted_output_then_max_tokens():
    now_ish = 1e9          # arrivals far in the future of monotonic(): nothing is aged
    waiting = [_req("long", 8, now_ish, predicted=60), _req("short", 8, now_ish + 1, predicted=4),
               _req("unknown", 8, now_ish + 2, max_tokens=30), _req("vip", 8, now_ish + 3, predicted=60, priority=2)]
    policy = make_policy("sjf", aging_s=10.0)
    assert [r.request_id for r in policy.admission_order(waiting)] == ["vip", "short", "unknown", "long"]
    assert policy.preemption_victim(waiting).request_id == "long"      # lowest priority, most work left
    assert [r.request_id for r in make_policy("fcfs").admission_order(reversed(waiting))] == \
        ["long", "short", "unknown", "vip"]


def test_engine_sjf_ages_into_arrival_order():
    old = _req("old-long", 8, 0.0, predicted=500)            # arrival 0: waited far more than 1 s
    fresh = _req("fresh-short", 8, 1e9, predicted=1)
    assert [r.request_id for r in SjfPolicy(aging_s=1.0).admission_order([fresh, old])] == ["old-long", "fresh-short"]


def test_predicted_work_of_engine_requests():
    r = _req("r", 64, 0.0, predicted=10)
    assert predicted_work(r) == pytest.approx(64 * PROMPT_TOKEN_COST + 10)
    r.num_computed_tokens = 64
    r.output_token_ids = [5, 6, 7]
    r.num_computed_tokens = 66              # decoding: one token left to compute, output so far counts
    assert predicted_work(r) == pytest.approx(7)
    prefill_only = Request("p", list(range(3, 35)), SamplingParams(max_tokens=64), handoff=True)
    assert predicted_work(prefill_only) == pytest.approx(32 * PROMPT_TOKEN_COST + 1)


# ---- no starvation under an adversarial stream --------------------------------------------------
def simulate(jobs, aging_s):
    """One server, non-preemptive, sjf with aging. jobs: [(arrival, work)] with work = service
    seconds. Returns each job's start time."""
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    start = [None] * len(jobs)
    t, k, waiting = 0.0, 0, []
    while k < len(order) or waiting:
        if not waiting and k < len(order) and jobs[order[k]][0] > t:
            t = jobs[order[k]][0]
        while k < len(order) and jobs[order[k]][0] <= t:
            waiting.append(order[k])
            k += 1
        nxt = min(waiting, key=lambda i: order_key(SJF, priority=0, arrival=jobs[i][0], work=jobs[i][1], now=t,
                                                    aging_s=aging_s))
        waiting.remove(nxt)
        start[nxt] = t
        t += jobs[nxt][1]
    return start


@settings(max_examples=200, deadline=None)
@given(long_work=st.floats(1.0, 20.0), aging_s=st.floats(0.5, 10.0),
       stream=st.lists(st.tuples(st.floats(0.0, 200.0), st.floats(0.05, 2.0)), min_size=1, max_size=120),
       dense=st.booleans())
def test_nothing_starves_under_an_adversarial_stream(long_work, aging_s, stream, dense):
    """A long job arrives at 0 while an adversary keeps sending shorter ones (a dense back-to-back
    stream, or arbitrary arrivals). Bound: from `aging_s` on, nothing that arrived after the long
    job starts before it, so it starts by max(arrival + aging_s, the end of the job running then)
    plus the work of those that arrived before it."""
    if dense:      # back-to-back short jobs, enough to keep the server busy well past the aging bound
        t, jobs = 0.0, []
        for _, w in stream:
            jobs.append((t, w))
            t += w * 0.9
    else:
        jobs = sorted(stream)
    jobs = [(0.0, long_work)] + [(a + 1e-6, w) for a, w in jobs]          # job 0 is the long one
    start = simulate(jobs, aging_s)
    max_work = max(w for _, w in jobs)
    assert start[0] <= aging_s + max_work + 1e-9
    # and every job, not only the long one, is bounded the same way
    for i, (a, _) in enumerate(jobs):
        earlier = sum(w for j, (b, w) in enumerate(jobs) if j != i and b <= a and start[j] >= a)
        assert start[i] <= a + aging_s + max_work + earlier + 1e-6


def test_sjf_beats_fcfs_mean_wait_on_mixed_work():
    """The point of sjf: on a backlog of mixed work the mean wait drops (pure simulation)."""
    jobs = [(0.0, w) for w in (9.0, 1.0, 8.0, 1.0, 7.0, 1.0, 1.0)]
    sjf = simulate(jobs, aging_s=1e9)
    fcfs = []
    t = 0.0
    for _, w in jobs:
        fcfs.append(t)
        t += w
    assert sum(sjf) < 0.5 * sum(fcfs)
