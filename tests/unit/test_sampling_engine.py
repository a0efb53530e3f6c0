"""Sampling features inside the engine: penalties, logit_bias and min_tokens give the same tokens
whatever the batch, after a prefill → decode handoff and after a live migration (the state is
rebuilt from the request's tokens); plain requests stay on the fast path; the n choices of a prompt
compute it once (twins wait, then attach the cached blocks)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.engine.builder import build_engine
from services.engine.config import Role
from services.engine.loader import resolve_model
from services.engine.sampling_params import SamplingParams
from tests.conftest import random_prompts

VOCAB = 512
# The tiny random model never repeats a token greedily; a small bias on token 7 makes it repeat on
# prompt 1 (from its 3rd token), so the penalties have something to act on.
BIAS = ((7, 1.5),)
PENALISED = [
    SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.7, logit_bias=BIAS),
    SamplingParams(max_tokens=20, ignore_eos=True, presence_penalty=1.5, logit_bias=((7, 3.0), (9, -100.0))),
    SamplingParams(max_tokens=20, temperature=0.9, seed=4, frequency_penalty=1.0, min_p=0.05, min_tokens=20),
]


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny")


def engine(tiny, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_num_batched_tokens", 128)
    return build_engine("tiny", loaded=tiny, dtype="float32", **kw)


def finals(e) -> dict:
    out = {}
    while e.has_schedulable():
        for o in e.step():
            if o.finished:
                out[o.request_id] = o
    return out


@pytest.fixture(scope="module")
def alone(tiny):
    """Each (prompt, params) pair run on its own engine: the reference tokens."""
    prompts = random_prompts([12, 40], VOCAB, seed=5)
    ref = {}
    for i, p in enumerate(prompts):
        for j, sp in enumerate(PENALISED):
            ref[(i, j)] = engine(tiny).generate([p], sp)[0].token_ids
    return prompts, ref


def test_penalties_change_tokens_and_are_independent_of_the_batch(tiny, alone):
    prompts, ref = alone
    plain = engine(tiny).generate([prompts[1]], replace(PENALISED[0], repetition_penalty=1.0, frequency_penalty=0.0))
    assert plain[0].token_ids.count(7) > 10 and plain[0].token_ids != ref[(1, 0)]
    e = engine(tiny)
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(PENALISED))]
    ids = {e.add_request(prompts[i], PENALISED[j]): (i, j) for i, j in pairs}
    e.add_request(prompts[1], SamplingParams(max_tokens=30, ignore_eos=True))      # a plain neighbour
    out = finals(e)
    for rid, key in ids.items():
        assert out[rid].token_ids == ref[key], key
    assert len(ref[(0, 2)]) == 20 and e.runner.adjuster.num_slots_held == 0
    e.check_integrity()


def test_handoff_and_migration_keep_the_sampling_state(tiny, alone):
    prompts, ref = alone
    for j, sp in enumerate(PENALISED):
        # prefill instance samples the first token, a decode instance the rest (KV imported)
        p, d = engine(tiny, role=Role.PREFILL), engine(tiny, role=Role.DECODE)
        rid = p.add_request(prompts[1], sp)
        first = finals(p)[rid].token_ids
        d.import_request(prompts[1], first, sp, p.export_kv(rid), rid)
        p.release(rid)
        assert len(first) == 1 and finals(d)[rid].token_ids == ref[(1, j)], j

        # a live migration after 7 tokens: pause, copy every block, adopt, hand off
        a, b = engine(tiny), engine(tiny)
        rid = a.add_request(prompts[1], sp)
        while len(a.scheduler.requests[rid].output_token_ids) < 7:
            a.step()
        snap = a.pause(rid)
        table = b.reserve(rid, snap.num_computed_tokens)
        b.runner.kv[torch.tensor(table)] = a.runner.kv[torch.tensor(snap.block_table[:len(table)])]
        b.adopt(rid, snap.prompt_token_ids, snap.output_token_ids, snap.params, snap.priority, snap.output_logprobs)
        a.hand_off(rid)
        assert finals(b)[rid].token_ids == ref[(1, j)], j
        for e in (p, d, a, b):
            e.check_integrity()
            assert e.kv.num_used_blocks == 0


def test_plain_requests_take_no_adjustment(tiny):
    e = engine(tiny)
    e.add_request([5, 6, 7], SamplingParams(max_tokens=4, repetition_penalty=1.0, min_tokens=0))
    calls = []
    real = e.runner.sampler.__call__

    def spy(logits, params, indices, adjust=None):
        calls.append(adjust)
        return real(logits, params, indices, adjust)

    e.runner.sampler = spy
    finals(e)
    assert calls and all(a is None for a in calls)


def test_twins_compute_the_prompt_once(tiny):
    """Four requests of one 70-token prompt added together: one computes it and the other three
    follow it in the same step — sampled from its last row with their own seeds, its cached full
    blocks shared and its last partial block copied (70 = 8 blocks of 8 + 6) — so the prompt is
    computed once, in one step, and every output equals its own separate run."""
    prompt = random_prompts([70], VOCAB, seed=8)[0]
    e = engine(tiny)
    for s in range(4):
        e.add_request(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True))
    prefill_steps = []
    out = {}
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                out[o.request_id] = o
        if e.last_step_prefill_tokens:
            prefill_steps.append(e.last_step_prefill_tokens)
    assert prefill_steps == [70]
    assert sorted(o.num_cached_tokens for o in out.values()) == [0, 70, 70, 70]
    seeded = {s: engine(tiny).generate([prompt], SamplingParams(max_tokens=3, temperature=1.0, seed=s,
                                                                ignore_eos=True))[0].token_ids for s in range(4)}
    assert sorted(o.token_ids for o in out.values()) == sorted(seeded.values())
    e.check_integrity()
    assert e.kv.num_used_blocks == 0


def test_twins_follow_a_chunked_prompt_on_its_last_chunk_and_greedy_matches(tiny):
    """A prompt prefilled in chunks: its twins wait for the chunk that completes it, then follow it;
    greedy choices equal a single run's tokens; nothing leaks."""
    prompt = random_prompts([100], VOCAB, seed=9)[0]
    e = engine(tiny, max_num_batched_tokens=32)
    for _ in range(3):
        e.add_request(prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    prefill_tokens = 0
    finals = []
    while e.has_unfinished():
        finals += [o for o in e.step() if o.finished]
        prefill_tokens += e.last_step_prefill_tokens
    assert prefill_tokens == 100
    single = engine(tiny).generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids
    assert [o.token_ids for o in finals] == [single] * 3
    e.check_integrity()
    assert e.kv.num_used_blocks == 0


def test_a_twin_without_blocks_waits_and_runs_later(tiny):
    """When the follower's last block cannot be allocated it goes back to the queue unsampled (no
    stray logprob) and is served normally once blocks free up."""
    prompt = random_prompts([70], VOCAB, seed=10)[0]
    e = engine(tiny)
    for _ in range(2):
        e.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True, logprobs=0))
    real = e.kv.allocate
    refused = []

    def allocate(request_id, token_ids, num_tokens):
        if request_id.endswith("1") and not refused and num_tokens == len(prompt):
            refused.append(request_id)
            return None
        return real(request_id, token_ids, num_tokens)

    e.kv.allocate = allocate
    finals = []
    while e.has_unfinished():
        finals += [o for o in e.step() if o.finished]
    assert refused
    single = engine(tiny).generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids
    assert [o.token_ids for o in finals] == [single] * 2
    assert all(len(o.logprobs) == 2 for o in finals)
    e.check_integrity()
    assert e.kv.num_used_blocks == 0
