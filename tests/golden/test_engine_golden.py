"""Greedy tokens from the engine equal transformers' generate on the same weights."""
from __future__ import annotations

import json
import os

import pytest
import torch

from services.engine.builder import build_engine
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy

PROMPT_LENGTHS = [1, 7, 16, 17, 45, 128, 201, 300]
MAX_NEW = 24


def assert_matches_hf(engine, prompts, golden):
    from services.engine.sampling_params import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, logprobs=0))
    for i, (o, (ref_ids, ref_logps)) in enumerate(zip(outs, golden)):
        assert o.token_ids == ref_ids, f"prompt {i} (len {len(prompts[i])}): {o.token_ids} != {ref_ids}"
        assert o.logprobs == pytest.approx(ref_logps, abs=2e-3), f"prompt {i} logprobs"
    engine.check_integrity()
    assert engine.kv.num_used_blocks == 0


@pytest.fixture(scope="module")
def tiny_golden(export_named):
    d = export_named("tiny")
    prompts = random_prompts(PROMPT_LENGTHS, 512, seed=1)
    return d, prompts, hf_greedy(d, prompts, MAX_NEW)


# (block size, per-step token budget): budgets that are not multiples of the block size split
# prompts mid-block and mix prefill chunks with decodes in one step.
@pytest.mark.parametrize("block_size,budget", [(16, 2048), (16, 50), (8, 37), (8, 300)])
def test_tiny_matches_hf(tiny_golden, block_size, budget):
    d, prompts, golden = tiny_golden
    engine = build_engine(d, dtype="float32", block_size=block_size, max_num_batched_tokens=budget, num_blocks=400)
    assert_matches_hf(engine, prompts, golden)


def test_decode_steps_of_every_batch_size_match_hf(tiny_golden):
    """Staggered max_tokens: the decode-only steps (the decode path: no prefill row, every row
    sampled) shrink one request at a time from 8 to 1, and each request's tokens are HF's cut at
    its own max_tokens."""
    from services.engine.sampling_params import SamplingParams

    d, prompts, golden = tiny_golden
    engine = build_engine(d, dtype="float32", block_size=16, max_num_batched_tokens=2048, num_blocks=400)
    decode_batches = []

    def spy(module, args):
        ids, _, _, meta, _ = args[:5]
        if meta.num_decode == ids.shape[0]:
            decode_batches.append(meta.num_decode)

    hook = engine.runner.model.register_forward_pre_hook(spy)
    params = [SamplingParams(max_tokens=3 * (i + 1), logprobs=0) for i in range(len(prompts))]
    try:
        outs = engine.generate(prompts, params)
    finally:
        hook.remove()
    for i, (o, (ref_ids, ref_logps), p) in enumerate(zip(outs, golden, params)):
        assert o.token_ids == ref_ids[:p.max_tokens], f"prompt {i}"
        assert o.logprobs == pytest.approx(ref_logps[:p.max_tokens], abs=2e-3), f"prompt {i} logprobs"
    sizes = set(decode_batches)      # a request that meets EOS early leaves a size out
    assert {1, len(prompts)} <= sizes and len(sizes) >= len(prompts) - 2, sorted(sizes)
    engine.check_integrity()


@pytest.mark.slow          # the `small` model against transformers (~10 s)
def test_small_matches_hf(export_named):
    d = export_named("small")
    prompts = random_prompts(PROMPT_LENGTHS, 32000, seed=2)
    golden = hf_greedy(d, prompts, MAX_NEW)
    for block_size, budget in [(16, 100), (8, 2048)]:
        engine = build_engine(d, dtype="float32", block_size=block_size, max_num_batched_tokens=budget, num_blocks=200)
        assert_matches_hf(engine, prompts, golden)


def test_transformers_written_gqa_llama3_rope(tmp_path):
    """A directory written by transformers itself: GQA 8/2, untied, rope_theta 500000, llama3 scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=700, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():       # sharper logits so argmax is robust to float rounding
        model.lm_head.weight.normal_(0, 0.2)
        model.model.embed_tokens.weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    prompts = random_prompts(PROMPT_LENGTHS, 700, seed=3)
    golden = hf_greedy(str(tmp_path), prompts, MAX_NEW)
    engine = build_engine(str(tmp_path), dtype="float32", block_size=16, max_num_batched_tokens=64, num_blocks=300)
    assert engine.config.model.num_kv_heads == 2 and engine.config.model.rope_scaling
    assert_matches_hf(engine, prompts, golden)


def test_tied_embeddings(tmp_path, export_named):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.load(open(os.path.join(tmp_path, "config.json")))["tie_word_embeddings"] is True
    prompts = random_prompts([3, 20, 40], 300, seed=4)
    engine = build_engine(str(tmp_path), dtype="float32", block_size=8, max_num_batched_tokens=24, num_blocks=100)
    assert_matches_hf(engine, prompts, hf_greedy(str(tmp_path), prompts, MAX_NEW))


@pytest.mark.parametrize("mode,cap", [("layered", 24), ("layered", 5), ("chunked", 24)])
def test_prompts_mixed_into_decode_steps_match_hf(tiny_golden, mode, cap):
    """A small step budget admits the prompts a few at a time, so later ones are prefilled beside
    the earlier ones' decodes under the mixed cap: layered (a group of layers per step, the
    residual stream carried between steps) and chunked alike give HF's tokens."""
    d, prompts, golden = tiny_golden
    engine = build_engine(d, dtype="float32", block_size=8, max_num_batched_tokens=64, num_blocks=400,
                          max_num_seqs=3, mixed_prefill_tokens=cap, mixed_prefill_mode=mode)
    groups = []

    def spy(module, args):
        meta = args[3]
        if meta.layered is not None:
            groups.append((meta.layered.first, meta.layered.end))

    hook = engine.runner.model.register_forward_pre_hook(spy)
    try:
        assert_matches_hf(engine, prompts, golden)
    finally:
        hook.remove()
    if mode == "layered":
        assert any(first > 0 for first, _ in groups) and any(end < engine.config.model.num_layers for _, end in groups)
    else:
        assert not groups
