"""Compressed preemption in LLMEngine on the `tiny` model: the KV a restored request gets is its own
(within int8 error, in the right blocks), tokens before the preemption never change, and nothing
is left behind (blocks, store bytes) however the request ends."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.engine.builder import build_engine
from services.engine.config import ModelConfigError
from services.engine.preemption import COMPRESS
from services.engine.sampling_params import SamplingParams
from tests.conftest import random_prompts
# `tiny` and `make` (float32, block 8, 64-token budget; integrity-checked at teardown, which includes
# every compressed copy belonging to a waiting request: none may be left) are test_engine's.
from tests.unit.test_engine import make, tiny  # noqa: F401

VOCAB = 512
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


def _spy_kv(engine) -> tuple[dict, dict]:
    """Record each save's exact KV (before the step's forward) and each restore's result."""
    saved, restored = {}, {}
    move = engine.runner.move_kv

    def spy(out, store, costs):
        for s in out.kv_saves:
            saved[s.request_id] = engine.runner.kv[s.block_ids].clone()                 # [n, L, 2, bs, H, D]
        move(out, store, costs)
        for r in out.kv_restores:
            restored[r.request_id] = (r.skip, engine.runner.kv[r.block_ids].clone())
    engine.runner.move_kv = spy
    return saved, restored


def test_restored_kv_is_the_saved_kv_within_int8_error(make):
    prompts = random_prompts([40, 37, 45, 30, 42, 38], VOCAB, seed=11)
    engine = make(num_blocks=22, preemption_mode="compress")
    saved, restored = _spy_kv(engine)
    outs = engine.generate(prompts, GREEDY)
    p = engine.scheduler.preemption
    assert p.counts[COMPRESS] >= 1 and p.restored >= 1 and restored
    for rid, (skip, got) in restored.items():
        want = saved[rid][skip:skip + len(got)]
        err = (got - want).abs()
        bound = want.abs().amax(dim=-1, keepdim=True) / 127 * 0.5 + 1e-6      # half a step per token-head
        assert torch.all(err <= bound), rid
    assert all(len(o.token_ids) == 40 for o in outs)
    assert engine.kv.num_used_blocks == 0


def test_tokens_before_a_preemption_never_change_and_divergence_is_reported(make):
    prompts = random_prompts([40, 37, 45, 30, 42, 38], VOCAB, seed=11)
    reference = make(num_blocks=400).generate(prompts, GREEDY)
    engine = make(num_blocks=22, preemption_mode="compress")
    at = {}                     # request id → output tokens it had when first compressed
    original = engine.scheduler._preempt

    def spy(request, out):
        at.setdefault(request.request_id, request.num_output_tokens)
        original(request, out)
    engine.scheduler._preempt = spy
    outs = engine.generate(prompts, GREEDY)
    assert at
    for ref, out in zip(reference, outs):
        rid = out.request_id
        first_diff = next((i for i, (x, y) in enumerate(zip(ref.token_ids, out.token_ids)) if x != y), None)
        if first_diff is not None:
            assert rid in at and first_diff >= at[rid], (rid, first_diff, at.get(rid))


def test_auto_compresses_only_when_measured_cheaper(make):
    prompts = random_prompts([40, 37, 45, 30, 42, 38], VOCAB, seed=11)
    engine = make(num_blocks=22, preemption_mode="auto")
    p = engine.scheduler.preemption
    assert p.copy_s_per_block > 0                       # calibrated when built
    engine.generate(prompts, GREEDY)
    assert sum(p.counts.values()) >= 1


def _step_until_compressed(make):
    """An engine under block pressure stepped until one request's KV is held compressed:
    (engine, every request id, that request's id)."""
    prompts = random_prompts([40, 37, 45, 30, 42, 38], VOCAB, seed=11)
    engine = make(num_blocks=22, preemption_mode="compress")
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    while not len(engine.scheduler.kv_store):
        engine.step()
    (victim,) = engine.scheduler.kv_store.ids()[:1]
    return engine, ids, victim


def test_abort_of_a_compressed_waiting_request_frees_its_copy(make):
    engine, ids, victim = _step_until_compressed(make)
    assert engine.scheduler.kv_store.bytes_used > 0
    engine.abort_request(victim)
    assert victim not in engine.scheduler.kv_store
    for rid in ids:
        engine.abort_request(rid)
    assert engine.kv.num_used_blocks == 0 and engine.scheduler.kv_store.bytes_used == 0


def test_bad_preemption_settings_name_the_choice(tiny):
    with pytest.raises(ModelConfigError, match="preemption mode must be one of recompute, compress, auto"):
        build_engine("tiny", loaded=tiny, preemption_mode="swap")
    with pytest.raises(ModelConfigError, match="kv_compress_fraction"):
        build_engine("tiny", loaded=tiny, kv_compress_fraction=-1)
    with pytest.raises(ModelConfigError, match="displace_ratio must be 0"):
        build_engine("tiny", loaded=tiny, displace_ratio=0.5)


def test_recompute_is_the_default_and_exact(make):
    prompts = random_prompts([40, 37, 45, 30, 42, 38], VOCAB, seed=11)
    reference = make(num_blocks=400).generate(prompts, replace(GREEDY, max_tokens=24))
    engine = make(num_blocks=22)
    assert engine.scheduler.preemption.mode == "recompute"
    outs = engine.generate(prompts, replace(GREEDY, max_tokens=24))
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert engine.scheduler.preemption.counts == {"recompute": engine.scheduler.preemption.counts["recompute"], COMPRESS: 0}
    assert engine.scheduler.preemption.counts["recompute"] >= 1


def test_a_compressed_request_paused_for_migration_passes_the_integrity_check(make):
    engine, ids, victim = _step_until_compressed(make)
    assert engine.pause(victim) is not None
    engine.check_integrity()                     # its copy belongs to a paused waiting request
    assert engine.resume(victim)
    engine.check_integrity()
    for rid in ids:
        engine.abort_request(rid)
    assert engine.scheduler.kv_store.bytes_used == 0
