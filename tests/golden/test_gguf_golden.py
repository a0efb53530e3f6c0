"""Greedy tokens of the engine on GGUF files equal transformers' own GGUF loading of the same file
(`from_pretrained(dir, gguf_file=...)`, float32): a small quantized file written here, and the real
model smollm2-135m with chat prompts through its own template."""
from __future__ import annotations

import pytest

from services.engine.builder import build_engine
from services.engine.config import ModelConfig
from services.engine.loader import random_hf_tensors
from services.engine.sampling_params import SamplingParams
from tests.conftest import random_prompts
from tests.gguf_files import write_llama_gguf
from tests.golden import smollm2_reference as ref

pytestmark = pytest.mark.timeout(600)


def engine_greedy(model: str, prompts, max_tokens: int) -> list[tuple[int, ...]]:
    engine = build_engine(model, dtype="float32", num_blocks=256, max_num_batched_tokens=64)
    outs = engine.generate([list(p) for p in prompts], SamplingParams(max_tokens=max_tokens))
    engine.check_integrity()
    assert engine.kv.num_used_blocks == 0
    return [tuple(o.token_ids) for o in outs]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_quantized_gqa_file_matches_transformers(tmp_path, qtype):
    cfg = ModelConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8,
                      num_kv_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
                      model_id="q")
    weights = random_hf_tensors(cfg, seed=9)
    path = tmp_path / f"m-{qtype}.gguf"
    write_llama_gguf(path, cfg, weights, qtype=qtype)
    prompts = tuple(tuple(p) for p in random_prompts([1, 9, 40, 70], 400, seed=11))
    assert engine_greedy(str(path), prompts, 16) == list(ref.hf_greedy(str(path), prompts, 16))


@pytest.mark.slow          # the real 135M model in our engine and in transformers (~30 s)
def test_smollm2_chat_matches_transformers():
    path = ref.smollm2_file()
    prompts = ref.chat_prompts(path)
    assert prompts == ref.hf_tokenizer_ids(path), "chat template + tokenizer differ from transformers'"
    expected = ref.hf_greedy(path, prompts, ref.MAX_NEW)
    assert engine_greedy("smollm2-135m", prompts, ref.MAX_NEW) == list(expected)
