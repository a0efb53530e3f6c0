"""The engine side of live migration without processes: pre-copy while the request decodes, pause,
copy the rest, adopt on a second engine, hand off on the first. Tokens equal transformers'
greedy output; a resumed (aborted) migration and a recompute move do too; no block leaks."""
from __future__ import annotations

import pytest
import torch

from services.engine.builder import build_engine
from services.engine.config import Role
from services.engine.request import FinishReason
from services.engine.sampling_params import SamplingParams
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy

LENGTHS = [7, 40, 130]
MAX_TOKENS = 30


@pytest.fixture(scope="module")
def golden(export_named):
    d = export_named("tiny")
    prompts = random_prompts(LENGTHS, 512, seed=31)
    return d, prompts, [ids for ids, _ in hf_greedy(d, prompts, MAX_TOKENS)]


def run(engine, until=None) -> dict:
    """Step until every request finished (or `until()` is true); final outputs by id."""
    finals = {}
    while engine.has_schedulable() and not (until and until()):
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = o
    return finals


def copy_blocks(src, dst, src_table, dst_table, first: int, end: int) -> None:
    # kv: [num_blocks, layers, 2, block_size, kv_heads, head_dim]
    dst.runner.kv[torch.tensor(dst_table[first:end])] = src.runner.kv[torch.tensor(src_table[first:end])]


@pytest.mark.parametrize("move_at", [1, 9, MAX_TOKENS - 2])
def test_precopy_then_stop_and_copy_matches_hf(golden, move_at):
    d, prompts, expected = golden
    a = build_engine(d, dtype="float32", role=Role.COLOCATED, block_size=8, num_blocks=200)
    b = build_engine(d, dtype="float32", role=Role.DECODE, block_size=8, num_blocks=200)
    params = SamplingParams(max_tokens=MAX_TOKENS)
    ids = [a.add_request(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)]
    live = a.scheduler.requests
    finals = run(a, until=lambda: all(i not in live or len(live[i].output_token_ids) >= move_at for i in ids))
    bs = 8
    for rid in ids:
        snap = a.migration_snapshot(rid)
        if snap is None:                                                       # ended early (EOS)
            continue
        table = b.reserve(rid, snap.num_computed_tokens)                      # stage 0 while it decodes
        copy_blocks(a, b, snap.block_table, table, 0, -(-snap.num_computed_tokens // bs))
        copied = snap.num_computed_tokens
        for o in a.step():                                                    # it decodes on A meanwhile
            if o.finished:
                finals[o.request_id] = o
        snap = a.pause(rid)
        if snap is None:                                                       # finished meanwhile
            b.release(rid)
            continue
        table = b.extend_reservation(rid, snap.num_computed_tokens)
        copy_blocks(a, b, snap.block_table, table, copied // bs, -(-snap.num_computed_tokens // bs))
        b.adopt(rid, snap.prompt_token_ids, snap.output_token_ids, snap.params, snap.priority, snap.output_logprobs)
        out = a.hand_off(rid)
        assert out.finish_reason == FinishReason.HANDOFF and out.request_id == rid
    finals.update(run(a))
    finals.update(run(b))
    for i, rid in enumerate(ids):
        assert finals[rid].token_ids == expected[i], rid
    for e in (a, b):
        e.check_integrity()
        assert e.kv.num_used_blocks == 0 and not e.scheduler.paused


def test_resumed_and_recomputed_moves_match_hf(golden):
    d, prompts, expected = golden
    a = build_engine(d, dtype="float32", role=Role.COLOCATED, block_size=8, num_blocks=200)
    b = build_engine(d, dtype="float32", role=Role.DECODE, block_size=8, num_blocks=200)
    params = SamplingParams(max_tokens=MAX_TOKENS)
    a.add_request(prompts[2], params, request_id="resumed")
    a.add_request(prompts[1], params, request_id="recomputed")
    run(a, until=lambda: len(a.scheduler.requests["resumed"].output_token_ids) >= 5)
    # an aborted migration: paused, then resumed where it was; the destination frees its reservation
    snap = a.pause("resumed")
    b.reserve("resumed", snap.num_computed_tokens)
    assert a.step() and "resumed" not in {r.request_id for r in a.scheduler.running}
    assert a.resume("resumed")
    b.release("resumed")
    # a move without KV: the destination recomputes prompt + output
    snap = a.pause("recomputed")
    b.reserve("recomputed", 0)
    b.adopt("recomputed", snap.prompt_token_ids, snap.output_token_ids, snap.params, recompute=True)
    a.hand_off("recomputed")
    finals = run(a)
    finals.update(run(b))
    assert finals["resumed"].token_ids == expected[2]
    assert finals["recomputed"].token_ids == expected[1]
    for e in (a, b):
        e.check_integrity()
        assert e.kv.num_used_blocks == 0
