"""A prefill instance's twins (the n choices of one prompt) follow the request that computes the
prompt: each takes a copy of its KV after the step and the pusher sends that copy whole, every layer,
to the twin's transfer — so the decode side gets the same KV a computed twin would have sent."""
from __future__ import annotations

import pytest
import torch

from services.engine.builder import build_engine
from services.engine.config import Role
from services.engine.loader import resolve_model
from services.engine.request import FinishReason
from services.engine.sampling_params import SamplingParams
from services.worker.kv_push import PrefillPusher
from tests.conftest import random_prompts
from tests.unit.test_kv_push_failures import FakeTransfer

BLOCK = 8


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny")


def test_followers_kv_is_pushed_whole_and_equals_the_computed_prompts(tiny):
    engine = build_engine("tiny", loaded=tiny, role=Role.PREFILL, dtype="float32", block_size=BLOCK,
                          num_blocks=256, max_num_batched_tokens=128)
    layers = engine.config.model.num_layers
    pusher = PrefillPusher(engine.kv.block_table, BLOCK, layers, layer_group=1)
    engine.on_prefill_layer, engine.on_forked = pusher, pusher.push_whole
    prompt = random_prompts([70], 512, seed=12)[0]                  # 8 full blocks + 6 tokens
    transfers = {f"c{i}": FakeTransfer() for i in range(3)}
    pusher.register("c0", transfers["c0"])
    pusher.register("c1", transfers["c1"])
    pusher.register("c2")                                           # its transfer opens later: pushes held
    for rid in transfers:
        engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True), request_id=rid)
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
    assert sorted(o.num_cached_tokens for o in outs.values()) == [0, 70, 70]   # one computed, two followed
    assert {o.finish_reason for o in outs.values()} == {FinishReason.HANDOFF}, outs
    assert len({tuple(o.token_ids) for o in outs.values()}) == 1            # greedy: one first token
    pusher.attach("c2", transfers["c2"])
    blocks = -(-70 // BLOCK)
    kv = engine.runner.kv
    computed = next(rid for rid, o in outs.items() if o.num_cached_tokens == 0)
    for rid, t in transfers.items():
        assert t.covered() == {(b, layer) for b in range(blocks) for layer in range(layers)}, rid
        table = engine.kv.block_table(rid)
        if rid != computed:
            assert t.pushes == [(table[:blocks], 0, 0, layers)]               # whole, after the step
        # token 69's K/V (the copied last block holds it) equal the computed request's
        last = (table[-1], engine.kv.block_table(computed)[-1])
        assert torch.equal(kv[last[0], :, :, :6], kv[last[1], :, :, :6])
    for rid in transfers:
        assert pusher.unregister(rid) is None
        engine.kv.free(rid)
    engine.check_integrity()
    assert engine.kv.num_used_blocks == 0
