"""Ordering never changes a request's tokens: greedy outputs under the sjf queue policy (a queue
that really reorders: two running at a time, predictions that invert arrival order, a priority
class, preemption under a small KV pool) equal transformers' generate on the same weights."""
from __future__ import annotations

import pytest

from services.engine.builder import build_engine
from services.engine.sampling_params import SamplingParams
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy

LENGTHS = [3, 40, 9, 17, 64, 5, 30, 12]
MAX_NEW = [16, 4, 12, 2, 9, 14, 6, 10]


@pytest.fixture(scope="module")
def golden(export_named):
    d = export_named("tiny")
    prompts = random_prompts(LENGTHS, 512, seed=21)
    return d, prompts, [ids[:n] for (ids, _), n in zip(hf_greedy(d, prompts, max(MAX_NEW)), MAX_NEW)]


@pytest.mark.parametrize("num_blocks", [400, 12], ids=["roomy", "preempting"])
def test_sjf_matches_hf(golden, num_blocks):
    d, prompts, expected = golden
    engine = build_engine(d, dtype="float32", block_size=8, max_num_batched_tokens=48, max_num_seqs=2,
                          num_blocks=num_blocks, policy="sjf", aging_s=1e6)
    order = []
    ids = []
    for i, (p, n) in enumerate(zip(prompts, MAX_NEW)):
        ids.append(engine.add_request(p, SamplingParams(max_tokens=n), priority=1 if i == 6 else 0,
                                      predicted_output_tokens=100 - 10 * i))     # later = predicted shorter
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
                order.append(o.request_id)
    for i, rid in enumerate(ids):
        assert final[rid].token_ids == expected[i], f"prompt {i}"
    assert order.index(ids[6]) < order.index(ids[0])          # the queue was reordered
    engine.check_integrity()
    assert engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("mode", ["recompute", "compress"])
def test_sjf_displacement_matches_hf(golden, mode):
    """Two slots held by requests predicted long; the rest, predicted short, take their slots
    (displacement). Tokens stay HF's whichever way the victims come back (in float32 int8 KV
    changed no token of these prompts; the compress case checks the restore path end to end)."""
    d, prompts, expected = golden
    engine = build_engine(d, dtype="float32", block_size=8, max_num_batched_tokens=48, max_num_seqs=2,
                          num_blocks=400, policy="sjf", aging_s=1e6, preemption_mode=mode)
    def add(i):
        return engine.add_request(prompts[i], SamplingParams(max_tokens=MAX_NEW[i]),
                                  predicted_output_tokens=200 if i < 2 else 1)
    ids = [add(0), add(1)]
    engine.step()                                  # the two predicted long take both slots
    engine.step()                                  # ... and decode
    ids += [add(i) for i in range(2, len(prompts))]
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    assert engine.scheduler.preemption.displaced >= 1
    if mode == "compress":
        assert engine.scheduler.preemption.restored >= 1
    for i, rid in enumerate(ids):
        assert final[rid].token_ids == expected[i], f"prompt {i}"
    engine.check_integrity()
    assert engine.kv.num_used_blocks == 0 and len(engine.scheduler.kv_store) == 0
