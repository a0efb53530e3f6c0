"""Unit tests for services.engine.scheduler: no model, fake sampled tokens, exact chunk sizes."""
from __future__ import annotations

import itertools

import pytest

from services.engine.config import Role, SchedulerConfig
from services.engine.kv_cache import KVCacheManager
from services.engine.request import FinishReason, Request, RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerOutput

EOS = 2
FAKE_TOKEN = 99          # what the fake model "samples" unless told otherwise
_bases = itertools.count(1000, 1000)


@pytest.fixture
def make():
    """make(...) → Scheduler on a fresh KVCacheManager; every manager is integrity-checked at teardown."""
    created: list[KVCacheManager] = []

    def _make(*, budget=2048, max_num_seqs=256, num_blocks=64, block_size=4, prefix=True,
              role=Role.COLOCATED, policy="fcfs", threshold=0, max_model_len=1024, mixed_mode="chunked",
              num_layers=0) -> Scheduler:
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)
        created.append(kv)
        cfg = SchedulerConfig(role=role, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                              long_prefill_token_threshold=threshold, policy=policy, mixed_prefill_mode=mixed_mode)
        return Scheduler(cfg, kv, max_model_len, num_layers)

    yield _make
    for kv in created:
        kv.check_integrity()


def req(rid: str, n_prompt: int, arrival: float, *, max_tokens=16, base=None, priority=0, handoff=False,
        **params) -> Request:
    """A request whose prompt is n_prompt distinct ids (distinct across request ids unless `base` is shared)."""
    base = next(_bases) if base is None else base
    return Request(rid, [base + i for i in range(n_prompt)],
                   SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=(EOS,), priority=priority, arrival_time=arrival, handoff=handoff)


def step(sched: Scheduler, tokens: dict[str, int] | None = None):
    """schedule() + update() with fake tokens for every chunk that samples. Returns (out, finished, shape).

    shape: {"decodes": [(rid, n)], "prefills": [(rid, n)]} captured before update() moves counters.
    """
    tokens = tokens or {}
    out = sched.schedule()
    shape = {"decodes": [(c.request.request_id, c.num_new_tokens) for c in out.decodes],
             "prefills": [(c.request.request_id, c.num_new_tokens) for c in out.prefills]}
    sampled = {c.request.request_id: tokens.get(c.request.request_id, FAKE_TOKEN)
               for c in out.decodes + out.prefills if c.samples}
    finished = sched.update(out, sampled)
    sched.kv.check_integrity()
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        # a running request's table always covers what it has computed
        assert len(sched.kv.block_table(r.request_id)) * sched.kv.block_size >= r.num_computed_tokens
    return out, finished, shape


# ---------------------------------------------------------------- token budget and chunking
def test_chunk_sizes_under_token_budget(make):
    s = make(budget=10)
    a, b = req("a", 25, 0.0, max_tokens=2), req("b", 3, 1.0, max_tokens=2)
    s.add(a)
    s.add(b)
    _, _, shape = step(s)
    assert shape == {"decodes": [], "prefills": [("a", 10)]}
    assert a.num_computed_tokens == 10 and a.num_output_tokens == 0 and b.status == RequestStatus.WAITING
    _, _, shape = step(s)
    assert shape == {"decodes": [], "prefills": [("a", 10)]}
    out, _, shape = step(s)
    assert shape == {"decodes": [], "prefills": [("a", 5), ("b", 3)]}
    assert out.num_tokens == 8
    assert a.output_token_ids == [FAKE_TOKEN] and b.output_token_ids == [FAKE_TOKEN]
    _, finished, shape = step(s)
    assert shape == {"decodes": [("a", 1), ("b", 1)], "prefills": []}
    assert {r.request_id for r in finished} == {"a", "b"}
    assert all(r.finish_reason == FinishReason.LENGTH for r in finished)
    assert s.num_unfinished == 0 and s.kv.num_used_blocks == 0
    assert s.schedule().is_empty


def test_intermediate_chunks_do_not_sample(make):
    s = make(budget=10)
    a = req("a", 25, 0.0)
    s.add(a)
    out = s.schedule()
    assert [c.samples for c in out.prefills] == [False]
    assert s.update(out, {}) == [] and a.output_token_ids == []
    assert a.num_computed_tokens == 10


def test_long_prefill_threshold_caps_a_chunk(make):
    s = make(budget=10, threshold=4)
    s.add(req("a", 9, 0.0, max_tokens=3))
    s.add(req("b", 2, 1.0, max_tokens=3))
    assert step(s)[2] == {"decodes": [], "prefills": [("a", 4), ("b", 2)]}
    assert step(s)[2] == {"decodes": [("b", 1)], "prefills": [("a", 4)]}
    assert step(s)[2] == {"decodes": [("b", 1)], "prefills": [("a", 1)]}


def test_decodes_are_served_before_a_new_prefill(make):
    s = make(budget=10)
    s.add(req("a", 3, 0.0, max_tokens=10))
    s.add(req("b", 3, 1.0, max_tokens=10))
    step(s)
    c = req("c", 25, 2.0, max_tokens=10)
    s.add(c)
    # decodes take their one token each first; the new prompt gets what is left of the budget
    assert step(s)[2] == {"decodes": [("a", 1), ("b", 1)], "prefills": [("c", 8)]}
    assert step(s)[2] == {"decodes": [("a", 1), ("b", 1)], "prefills": [("c", 8)]}
    assert step(s)[2] == {"decodes": [("a", 1), ("b", 1)], "prefills": [("c", 8)]}
    # the last prompt token of c is a 1-token chunk, but it is a prefill (c has no output yet)
    assert step(s)[2] == {"decodes": [("a", 1), ("b", 1)], "prefills": [("c", 1)]}
    assert c.num_output_tokens == 1
    assert step(s)[2] == {"decodes": [("a", 1), ("b", 1), ("c", 1)], "prefills": []}


def test_running_requests_are_served_before_older_waiting_ones(make):
    s = make(budget=10)
    r = req("r", 3, 5.0, max_tokens=10)
    s.add(r)
    step(s)
    w = req("w", 25, 0.0, max_tokens=10)        # arrived earlier, but it is waiting
    s.add(w)
    assert step(s)[2] == {"decodes": [("r", 1)], "prefills": [("w", 9)]}


def test_admission_in_arrival_order_not_add_order(make):
    s = make(budget=5)
    s.add(req("late", 5, 2.0))
    s.add(req("early", 5, 1.0))
    assert step(s)[2] == {"decodes": [], "prefills": [("early", 5)]}


def test_max_num_seqs_is_respected(make):
    s = make(max_num_seqs=2)
    s.add(req("a", 4, 0.0, max_tokens=1))
    s.add(req("b", 4, 1.0, max_tokens=3))
    s.add(req("c", 4, 2.0, max_tokens=3))
    out, finished, shape = step(s)
    assert shape == {"decodes": [], "prefills": [("a", 4), ("b", 4)]}
    assert [r.request_id for r in finished] == ["a"]
    assert [r.request_id for r in s.waiting] == ["c"]
    _, _, shape = step(s)      # a finished, so c fits under the cap now
    assert shape == {"decodes": [("b", 1)], "prefills": [("c", 4)]}
    assert len(s.running) == 2


def test_head_of_line_waits_for_blocks(make):
    s = make(num_blocks=4, block_size=4, prefix=False)
    a = req("a", 10, 0.0, max_tokens=2)        # 3 blocks
    b = req("b", 8, 1.0, max_tokens=2)         # 2 blocks: does not fit next to a
    c = req("c", 1, 2.0, max_tokens=2)         # would fit, but must not jump the queue
    for r in (a, b, c):
        s.add(r)
    _, _, shape = step(s)
    assert shape == {"decodes": [], "prefills": [("a", 10)]}
    assert not s.kv.has_request("b") and b.num_computed_tokens == 0
    assert not s.kv.has_request("c")
    step(s)                                   # a finishes (max_tokens=2)
    assert a.is_finished
    _, _, shape = step(s)
    assert shape == {"decodes": [], "prefills": [("b", 8), ("c", 1)]}


# ---------------------------------------------------------------- preemption
def test_preemption_victim_is_most_recent_and_recomputes(make):
    s = make(num_blocks=7, block_size=4, prefix=False)
    a = req("a", 8, 0.0, max_tokens=3)
    b = req("b", 8, 1.0, max_tokens=6)
    c = req("c", 8, 2.0, max_tokens=3)
    for r in (a, b, c):
        s.add(r)
    _, _, shape = step(s, {"a": 10, "b": 20, "c": 30})
    assert shape["prefills"] == [("a", 8), ("b", 8), ("c", 8)]
    assert s.kv.num_used_blocks == 6
    # every request now needs a 3rd block, only one is free: a gets it, b preempts c (newest)
    out, _, shape = step(s, {"a": 11, "b": 21})
    assert out.preempted == ["c"]
    assert shape == {"decodes": [("a", 1), ("b", 1)], "prefills": []}
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert not s.kv.has_request("c") and c in s.waiting and c not in s.running
    assert c.output_token_ids == [30]           # output so far is kept, to be recomputed
    assert a.num_preemptions == 0 and b.num_preemptions == 0
    assert s.kv.num_used_blocks == 6
    # c cannot come back while a and b hold 6 of 7 blocks
    out, finished, shape = step(s, {"a": 12, "b": 22})
    assert shape == {"decodes": [("a", 1), ("b", 1)], "prefills": []} and out.preempted == []
    assert [r.request_id for r in finished] == ["a"]
    # a's blocks are free: c is readmitted and recomputes prompt + its output so far in one chunk
    _, _, shape = step(s, {"b": 23, "c": 31})
    assert shape == {"decodes": [("b", 1)], "prefills": [("c", 9)]}
    assert c.status == RequestStatus.RUNNING and c.num_computed_tokens == 9
    assert c.output_token_ids == [30, 31]
    _, finished, shape = step(s, {"b": 24, "c": 32})
    assert shape == {"decodes": [("b", 1), ("c", 1)], "prefills": []}
    assert [r.request_id for r in finished] == ["c"] and c.finish_reason == FinishReason.LENGTH
    assert c.output_token_ids == [30, 31, 32]
    while s.num_unfinished:
        step(s)
    assert b.output_token_ids[:5] == [20, 21, 22, 23, 24] and len(b.output_token_ids) == 6
    assert s.kv.num_used_blocks == 0


def test_request_preempts_itself_when_it_is_the_newest(make):
    s = make(num_blocks=5, block_size=4, prefix=False)
    a = req("a", 8, 0.0, max_tokens=8)
    b = req("b", 8, 1.0, max_tokens=8)
    s.add(a)
    s.add(b)
    step(s)
    assert s.kv.num_used_blocks == 4
    out, _, shape = step(s)
    # a (oldest) takes the last free block; b needs one too and is the only candidate left
    assert out.preempted == ["b"] and shape == {"decodes": [("a", 1)], "prefills": []}
    assert b.status == RequestStatus.PREEMPTED and not s.kv.has_request("b")
    while s.num_unfinished:
        step(s)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert a.num_preemptions == 0 and b.num_preemptions >= 1


def test_preempted_request_hits_its_own_cached_prefix(make):
    s = make(num_blocks=7, block_size=4, prefix=True)
    a, b, c = req("a", 8, 0.0, max_tokens=3), req("b", 8, 1.0, max_tokens=6), req("c", 8, 2.0, max_tokens=3)
    for r in (a, b, c):
        s.add(r)
    step(s)
    out, _, _ = step(s)
    assert out.preempted == ["c"]
    step(s)
    assert a.is_finished
    out, _, shape = step(s)
    (rid, n), = shape["prefills"]
    # c's head block was freed as cached (its tail block was evicted first, for b): only the tail is recomputed
    assert rid == "c" and n == 5
    assert c.num_computed_tokens == 9


# ---------------------------------------------------------------- policies
def test_priority_policy_admits_higher_value_first(make):
    s = make(budget=4, policy="priority")
    s.add(req("p0", 4, 0.0, priority=0, max_tokens=1))
    s.add(req("p2", 4, 1.0, priority=2, max_tokens=1))
    s.add(req("p1", 4, 2.0, priority=1, max_tokens=1))
    s.add(req("p2b", 4, 3.0, priority=2, max_tokens=1))
    order = []
    while s.num_unfinished:
        order += [rid for rid, _ in step(s)[2]["prefills"]]
    assert order == ["p2", "p2b", "p1", "p0"]


def test_priority_policy_preempts_least_urgent_even_if_older(make):
    s = make(num_blocks=4, block_size=4, prefix=False, policy="priority")
    lazy = req("lazy", 8, 0.0, priority=0, max_tokens=4)
    urgent = req("urgent", 8, 1.0, priority=5, max_tokens=4)
    s.add(lazy)
    s.add(urgent)
    step(s)
    out, _, shape = step(s)
    assert out.preempted == ["lazy"] and shape["decodes"] == [("urgent", 1)]
    assert lazy.status == RequestStatus.PREEMPTED and urgent.num_preemptions == 0


def test_fcfs_preempts_newest_in_the_same_setup(make):
    s = make(num_blocks=4, block_size=4, prefix=False, policy="fcfs")
    lazy = req("lazy", 8, 0.0, priority=0, max_tokens=4)
    urgent = req("urgent", 8, 1.0, priority=5, max_tokens=4)
    s.add(lazy)
    s.add(urgent)
    step(s)
    out, _, _ = step(s)
    assert out.preempted == ["urgent"]


def test_unknown_policy_is_rejected(make):
    with pytest.raises(ValueError, match="policy"):
        make(policy="lifo")


# ---------------------------------------------------------------- roles and stops
def test_handoff_request_leaves_after_first_token(make):
    s = make(budget=6)
    a = req("a", 10, 0.0, max_tokens=16, handoff=True)
    s.add(a)
    _, finished, _ = step(s)
    assert finished == [] and a.num_computed_tokens == 6
    _, finished, shape = step(s, {"a": 42})
    assert shape["prefills"] == [("a", 4)]
    assert finished == [a] and a.finish_reason == FinishReason.HANDOFF and a.output_token_ids == [42]
    # HANDOFF keeps the blocks for the KV transfer until the owner frees them.
    assert s.num_unfinished == 0 and s.kv.num_used_blocks == 3
    s.kv.free("a")
    assert s.kv.num_used_blocks == 0


def test_handoff_request_still_reports_eos_and_length(make):
    s = make()
    s.add(req("eos", 4, 0.0, max_tokens=16, handoff=True))
    s.add(req("len", 4, 1.0, max_tokens=1, handoff=True))
    _, finished, _ = step(s, {"eos": EOS, "len": 7})
    assert {r.request_id: r.finish_reason for r in finished} == {"eos": FinishReason.STOP,
                                                                  "len": FinishReason.LENGTH}


def test_stops_on_eos(make):
    s = make()
    a = req("a", 3, 0.0, max_tokens=16)
    s.add(a)
    step(s)
    _, finished, _ = step(s, {"a": EOS})
    assert finished == [a] and a.finish_reason == FinishReason.STOP
    assert a.output_token_ids == [FAKE_TOKEN, EOS] and s.kv.num_used_blocks == 0


def test_ignore_eos_keeps_going_until_max_tokens(make):
    s = make()
    a = req("a", 3, 0.0, max_tokens=4, ignore_eos=True)
    s.add(a)
    for _ in range(3):
        assert step(s, {"a": EOS})[1] == []
    _, finished, _ = step(s, {"a": EOS})
    assert finished == [a] and a.finish_reason == FinishReason.LENGTH
    assert a.output_token_ids == [EOS] * 4


def test_stop_token_ids(make):
    s = make()
    a = req("a", 3, 0.0, max_tokens=16, stop_token_ids=(7,), ignore_eos=True)
    s.add(a)
    step(s, {"a": 8})
    _, finished, _ = step(s, {"a": 7})
    assert finished == [a] and a.finish_reason == FinishReason.STOP and a.output_token_ids == [8, 7]


def test_max_tokens_gives_length(make):
    s = make()
    a = req("a", 3, 0.0, max_tokens=3)
    s.add(a)
    assert step(s)[1] == [] and step(s)[1] == []
    _, finished, _ = step(s)
    assert finished == [a] and a.finish_reason == FinishReason.LENGTH and a.num_output_tokens == 3


def test_context_length_gives_length(make):
    s = make(max_model_len=10)
    a = req("a", 8, 0.0, max_tokens=100)
    s.add(a)
    step(s)
    _, finished, _ = step(s)
    assert finished == [a] and a.finish_reason == FinishReason.LENGTH and a.num_tokens == 10


def test_finish_aborts_waiting_and_running_and_is_idempotent(make):
    s = make(budget=4)
    a, b = req("a", 10, 0.0), req("b", 3, 1.0)
    s.add(a)
    s.add(b)
    step(s)
    assert s.finish("a", FinishReason.ABORT) is a and a.finish_reason == FinishReason.ABORT
    assert s.finish("b", FinishReason.ABORT) is b
    assert s.finish("a", FinishReason.ABORT) is None and s.finish("nope", FinishReason.ABORT) is None
    assert s.num_unfinished == 0 and s.kv.num_used_blocks == 0 and not s.running and not s.waiting


def test_duplicate_live_request_id_is_rejected(make):
    s = make()
    s.add(req("a", 3, 0.0))
    with pytest.raises(ValueError, match="already in use"):
        s.add(req("a", 5, 1.0))
    assert s.num_unfinished == 1


# ---------------------------------------------------------------- prefix caching
@pytest.mark.parametrize("first_finishes", [True, False])
def test_prefix_cache_hit_starts_at_capped_full_block_prefix(make, first_finishes):
    s = make(block_size=8, num_blocks=32)
    first = req("first", 40, 0.0, base=500, max_tokens=1 if first_finishes else 8)
    s.add(first)
    step(s)
    assert first.is_finished == first_finishes
    second = req("second", 40, 1.0, base=500, max_tokens=2)
    s.add(second)
    out = s.schedule()
    (chunk,) = out.prefills
    # 40 tokens = 5 full blocks, but one token must be left to compute: 4 blocks hit
    assert chunk.request is second and second.num_computed_tokens == 32 and chunk.num_new_tokens == 8
    if not first_finishes:
        assert s.kv.block_table("second")[:4] == s.kv.block_table("first")[:4]
        assert s.kv.block_table("second")[4] != s.kv.block_table("first")[4]
    s.update(out, {r.request.request_id: FAKE_TOKEN for r in out.decodes + out.prefills if r.samples})
    assert second.num_computed_tokens == 40 and second.output_token_ids == [FAKE_TOKEN]


def test_prefix_cache_off_recomputes_everything(make):
    s = make(block_size=8, num_blocks=32, prefix=False)
    s.add(req("first", 40, 0.0, base=500, max_tokens=1))
    step(s)
    s.add(req("second", 40, 1.0, base=500, max_tokens=1))
    assert step(s)[2]["prefills"] == [("second", 40)]


def test_handoff_and_decoding_requests_share_an_instance(make):
    """An instance serving both roles: a hand-off request leaves after its first token while a
    request submitted to decode here goes on."""
    s = make()
    s.add(req("p", 4, 0.0, max_tokens=16, handoff=True))
    s.add(req("c", 4, 1.0, max_tokens=16))
    _, finished, _ = step(s, {"p": 5, "c": 6})
    assert [r.request_id for r in finished] == ["p"] and finished[0].finish_reason == FinishReason.HANDOFF
    _, finished, shape = step(s, {"c": 7})
    assert shape["decodes"] == [("c", 1)] and finished == []
    s.kv.free("p")


def test_mixed_prefill_tokens_caps_prompt_chunks_beside_decodes(make):
    s = make(budget=64)
    s.mixed_prefill_tokens = 5
    s.add(req("d", 4, 0.0, max_tokens=16))
    step(s, {"d": 5})                               # d decodes from now on
    s.add(req("a", 12, 1.0))
    _, _, shape = step(s, {"d": 6})
    assert shape["decodes"] == [("d", 1)] and shape["prefills"] == [("a", 5)]
    _, _, shape = step(s, {"d": 7})
    assert shape["prefills"] == [("a", 5)]          # a running prompt is capped too
    s.mixed_prefill_tokens = 0
    _, _, shape = step(s, {"d": 8, "a": 9})
    assert shape["prefills"] == [("a", 2)]


def test_mixed_prefill_cap_does_not_apply_without_decodes(make):
    s = make(budget=64)
    s.mixed_prefill_tokens = 5
    s.add(req("a", 12, 0.0))
    _, _, shape = step(s, {"a": 1})
    assert shape["prefills"] == [("a", 12)]


# ---------------------------------------------------------------- layered prefill beside decodes
def _layers(out):
    return [(c.request.request_id, c.num_new_tokens, None if c.layers is None else (c.layers.first, c.layers.end))
            for c in out.prefills]


def _decoding(make, num_layers, cap, decode_tokens=16):
    """A layered-mode scheduler whose request "d" is decoding, and its 12-token prompt "a" just sent."""
    s = make(budget=64, mixed_mode="layered", num_layers=num_layers)
    s.mixed_prefill_tokens = cap
    s.add(req("d", 4, 0.0, max_tokens=decode_tokens))
    step(s, {"d": 5})                               # d decodes from now on
    s.add(req("a", 12, 1.0))
    return s


def test_layered_prompt_goes_through_a_group_of_layers_per_step_within_the_cap(make):
    s = _decoding(make, 8, 6)
    seen = []
    for _ in range(4):
        out, _, shape = step(s, {"d": 6, "a": 7})
        seen.append(_layers(out))
        assert ("d", 1) in shape["decodes"]
        assert sum(c.cost for c in out.prefills) <= 6
    # 6 tokens of room x 8 layers / 12 tokens = 4 layers a step; all 12 tokens each time
    assert seen == [[("a", 12, (0, 4))], [("a", 12, (4, 8))], [], []]
    a = s.requests["a"]
    assert a.num_computed_tokens == 14 and a.output_token_ids == [7, 7, 7] and a.layers_done == 0


def test_layered_chunk_samples_only_after_its_last_layer(make):
    s = _decoding(make, 4, 3)
    out, _, _ = step(s)
    (chunk,) = out.prefills
    assert (chunk.layers.first, chunk.layers.end) == (0, 1) and not chunk.samples and chunk.cost == 3
    a = s.requests["a"]
    assert a.num_computed_tokens == 0 and a.layers_done == 1 and not a.output_token_ids
    assert len(s.kv.block_table("a")) == 3          # blocks for the whole prompt from its first group


def test_one_layered_prompt_at_a_time_and_the_next_waits(make):
    s = _decoding(make, 4, 6)
    s.add(req("b", 12, 2.0))
    out, _, _ = step(s)
    assert _layers(out) == [("a", 12, (0, 2))]      # b is not chunked beside a layered a
    out, _, _ = step(s)
    assert _layers(out) == [("a", 12, (2, 4))]
    out, _, _ = step(s)
    assert _layers(out) == [("b", 12, (0, 2))]


def test_layered_prompt_that_fits_the_room_is_a_plain_chunk_and_no_cap_means_plain(make):
    s = _decoding(make, 4, 16)
    out, _, _ = step(s)
    assert _layers(out) == [("a", 12, None)]
    s.add(req("b", 12, 2.0))
    s.mixed_prefill_tokens = 0
    out, _, _ = step(s)
    assert _layers(out) == [("b", 12, None)]


def test_layered_prompt_finishes_its_layers_at_once_when_the_decodes_are_gone(make):
    s = _decoding(make, 8, 3, decode_tokens=2)
    out, finished, _ = step(s)                      # d's last token; a goes through layers 0-2
    assert _layers(out) == [("a", 12, (0, 2))] and [r.request_id for r in finished] == ["d"]
    out, _, _ = step(s)
    assert _layers(out) == [("a", 12, (2, 8))]
    assert s.requests["a"].num_computed_tokens == 12 and s.requests["a"].output_token_ids == [FAKE_TOKEN]


def test_preempting_a_layered_prompt_starts_it_over(make):
    s = _decoding(make, 4, 3)
    step(s)
    a = s.requests["a"]
    a.layer_hidden = object()
    out = SchedulerOutput()
    s._preempt(a, out)
    assert (a.layers_done, a.layer_hidden, a.num_computed_tokens) == (0, None, 0)


def test_unknown_mixed_prefill_mode_is_refused():
    kv = KVCacheManager(8, 4)
    with pytest.raises(ValueError, match="mixed_prefill_mode must be one of chunked, layered"):
        Scheduler(SchedulerConfig(mixed_prefill_mode="tokens"), kv, 64)


def test_layered_mode_without_the_models_layer_count_chunks(make):
    s = _decoding(make, 0, 5)
    out, _, _ = step(s)
    assert _layers(out) == [("a", 5, None)]
