"""Prefill on a prefill-role engine, KV blocks copied to a decode-role engine, decode there:
the tokens equal transformers' greedy output, and neither side leaks a block."""
from __future__ import annotations

import pytest

from services.engine.builder import build_engine
from services.engine.config import Role
from services.engine.request import FinishReason
from services.engine.sampling_params import InvalidRequestError, SamplingParams
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy

LENGTHS = [1, 9, 16, 33, 120, 250]


@pytest.mark.parametrize("block_size,budget", [(16, 2048), (8, 40)])
def test_prefill_to_decode_handoff_matches_hf(export_named, block_size, budget):
    d = export_named("tiny")
    prompts = random_prompts(LENGTHS, 512, seed=21)
    golden = hf_greedy(d, prompts, 20)
    p_engine = build_engine(d, dtype="float32", role=Role.PREFILL, block_size=block_size,
                            max_num_batched_tokens=budget, num_blocks=200)
    d_engine = build_engine(d, dtype="float32", role=Role.DECODE, block_size=block_size, num_blocks=200)
    params = SamplingParams(max_tokens=20)
    firsts = p_engine.generate(prompts, params)
    for i, (out, prompt) in enumerate(zip(firsts, prompts)):
        assert out.finish_reason == FinishReason.HANDOFF and len(out.token_ids) == 1
        kv = p_engine.export_kv(out.request_id)
        p_engine.release(out.request_id)
        d_engine.import_request(prompt, out.token_ids, params, kv, request_id=f"d-{i}")
    finals = {}
    while d_engine.has_unfinished():
        for o in d_engine.step():
            if o.finished:
                finals[o.request_id] = o
    for i, (ref, _) in enumerate(golden):
        assert finals[f"d-{i}"].token_ids == ref, f"prompt {i} (len {LENGTHS[i]})"
    for e in (p_engine, d_engine):
        e.check_integrity()
        assert e.kv.num_used_blocks == 0


def test_decode_role_refuses_prompts_and_mismatched_kv(export_named):
    d = export_named("tiny")
    d_engine = build_engine(d, dtype="float32", role=Role.DECODE, block_size=16, num_blocks=50)
    with pytest.raises(InvalidRequestError, match="decode-only"):
        d_engine.add_request([5, 6, 7], SamplingParams())
    p_engine = build_engine(d, dtype="float32", role=Role.PREFILL, block_size=8, num_blocks=50)
    out = p_engine.generate([[5] * 20], SamplingParams(max_tokens=4))[0]
    kv = p_engine.export_kv(out.request_id)
    with pytest.raises(InvalidRequestError) as e:
        d_engine.import_request([5] * 20, out.token_ids, SamplingParams(), kv, request_id="x")
    assert e.value.field == "kv_blocks" and "block size" in str(e.value)
    p_engine.release(out.request_id)
    for eng in (p_engine, d_engine):
        eng.check_integrity()
        assert eng.kv.num_used_blocks == 0
