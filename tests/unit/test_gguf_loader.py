"""GGUF loading: llama.cpp-style files written here (Q/K permuted, quantized by gguf itself) read back
as the HF tensors, the metadata's config / tokenizer / chat template, and files Tandem cannot serve
refused with a ModelConfigError naming what is wrong and what is supported."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from services.engine.builder import build_engine, load_tokenizer
from services.engine.config import ModelConfig, ModelConfigError
from services.engine.gguf_loader import SUPPORTED_TENSOR_TYPES, load_gguf
from services.engine.loader import export_model, random_hf_tensors, resolve_model
from services.engine.sampling_params import SamplingParams
from tests.gguf_files import CHAT_TEMPLATE, write_llama_gguf

# GQA 4/2, every 2-D weight's rows a multiple of gguf's 32-value blocks, vocab past the byte alphabet
CFG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,), model_id="gguf-test")


@pytest.fixture(scope="module")
def weights():
    return random_hf_tensors(CFG, seed=5)


def write(tmp_path, weights, name="m.gguf", **kw):
    path = tmp_path / name
    return str(path), write_llama_gguf(path, CFG, weights, **kw)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_tensors_read_back_in_hf_order(tmp_path, weights, qtype):
    path, expected = write(tmp_path, weights, qtype=qtype)
    loaded = load_gguf(path)
    assert set(loaded.tensors) == set(expected)
    for name, values in expected.items():
        assert loaded.tensors[name].dtype == torch.float32
        assert torch.equal(loaded.tensors[name], torch.from_numpy(values)), name
    if qtype == "F32":           # lossless: exactly the HF tensors, so Q/K came back un-permuted
        assert all(torch.equal(loaded.tensors[k], weights[k]) for k in weights)


def test_config_tokenizer_and_template_from_metadata(tmp_path, weights):
    path, _ = write(tmp_path, weights, qtype="Q8_0")
    loaded = load_gguf(path, weights=False)
    cfg = loaded.config
    assert loaded.tensors == {} and loaded.model_file == path and loaded.model_dir is None
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.max_position_embeddings) == (320, 64, 128, 2, 4, 2, 16, 512)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,) and cfg.rms_norm_eps == pytest.approx(1e-6)
    assert cfg.model_id == "m"
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.chat_template_vars == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tok = load_tokenizer(loaded)
    assert tok is loaded.tokenizer and tok.eos_token_ids == (2,)
    ids = tok.encode("<|im_start|>user\nhello world 42<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2                            # control tokens matched whole, no BOS added
    assert tok.decode(ids) == "user\nhello world 42"               # control tokens skipped by decode
    vocab = tok.backend.get_vocab()
    assert vocab["hello"] in ids and vocab["Ġworld"] in ids         # merges applied
    assert [tok.id_to_token(i) for i in tok.encode("42")] == ["4", "2"]   # smollm: digits one by one


def test_add_bos_token_is_honoured(tmp_path, weights):
    path, _ = write(tmp_path, weights, add_bos=True)
    assert load_tokenizer(load_gguf(path, weights=False)).encode("hi")[0] == 1


def test_engine_on_gguf_generates_what_the_exported_directory_does(tmp_path, weights):
    """F32 GGUF (permuted Q/K) and an HF directory of the same weights: same greedy tokens."""
    from services.engine.loader import LoadedModel

    path, _ = write(tmp_path, weights)
    d = str(tmp_path / "hf")
    export_model(LoadedModel(CFG, weights, None), d)
    prompts = [[1, 40, 50, 60], list(range(3, 40))]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = [[o.token_ids for o in build_engine(m, dtype="float32", num_blocks=64).generate(prompts, params)]
            for m in (path, d)]
    assert outs[0] == outs[1]


def test_resolve_model_takes_a_file_or_a_directory_of_one(tmp_path, weights):
    path, _ = write(tmp_path, weights)
    assert resolve_model(path, weights=False).model_file == path
    assert resolve_model(str(tmp_path), weights=False).model_file == path
    write(tmp_path, weights, name="other.gguf")
    with pytest.raises(ModelConfigError, match=r"holds 2 GGUF files \(m.gguf, other.gguf\)"):
        resolve_model(str(tmp_path))


def test_other_architecture_is_refused(tmp_path, weights):
    path, _ = write(tmp_path, weights, arch="qwen2")
    with pytest.raises(ModelConfigError, match=r"architecture 'qwen2' is not supported; .* architecture 'llama'"):
        load_gguf(path)


def test_unsupported_tensor_type_is_refused_naming_it(tmp_path, weights):
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]      # 32 values in 18 bytes
    raw = np.zeros((CFG.intermediate_size, CFG.hidden_size // block * size), dtype=np.uint8)
    path, _ = write(tmp_path, weights, raw={"model.layers.1.mlp.up_proj.weight": (raw, "IQ4_NL")})
    with pytest.raises(ModelConfigError) as e:
        load_gguf(path, weights=False)             # refused before any weight is read
    msg = str(e.value)
    assert "tensor blk.1.ffn_up.weight is of type IQ4_NL, which is not supported" in msg
    assert "supported types: " + ", ".join(SUPPORTED_TENSOR_TYPES) in msg


def test_not_a_gguf_file_is_refused(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelConfigError, match="cannot be read as a GGUF file"):
        resolve_model(str(bad))


def test_named_real_model_missing_from_the_cache_names_make_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_MODEL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelConfigError) as e:
        resolve_model("smollm2-135m", weights=False)
    msg = str(e.value)
    assert "make setup" in msg and str(tmp_path / "empty") in msg and "TANDEM_MODEL_CACHE" in msg


def test_named_real_model_is_read_from_the_cache(tmp_path, monkeypatch, weights):
    from services.engine import model_store

    monkeypatch.setenv("TANDEM_MODEL_CACHE", str(tmp_path))
    target = model_store.model_path("smollm2-135m")
    os.makedirs(target.parent)
    write_llama_gguf(target, CFG, weights)
    loaded = resolve_model("smollm2-135m", weights=False)
    assert loaded.model_file == str(target) and loaded.config.model_id == "smollm2-135m"
    assert model_store.fetch("smollm2-135m") == str(target)        # cached: no download
