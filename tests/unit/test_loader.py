"""Model directories the engine cannot serve fail with a ModelConfigError that says what is wrong."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.engine.builder import build_engine
from services.engine.config import ModelConfigError
from services.engine.loader import NAMED_MODELS, load_model_dir, resolve_model
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import TokenizerLoadError

WEIGHTS = "model.safetensors"


@pytest.fixture
def model_dir(export_named, tmp_path):
    """A private copy of the exported tiny model directory, free to break."""
    d = tmp_path / "tiny-hf"
    shutil.copytree(export_named("tiny"), d)
    return d


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(d, fn):
    tensors = load_file(str(d / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(d / WEIGHTS))


def load_error(d) -> str:
    with pytest.raises(ModelConfigError) as e:
        load_model_dir(str(d))
    return str(e.value)


def test_exported_directory_round_trips(model_dir):
    loaded = load_model_dir(str(model_dir))
    named = resolve_model("tiny")
    tiny = NAMED_MODELS["tiny"]
    assert (loaded.config.vocab_size, loaded.config.num_heads, loaded.config.num_kv_heads) == \
        (tiny.vocab_size, tiny.num_heads, tiny.num_kv_heads)
    assert loaded.config.eos_token_ids == tiny.eos_token_ids and loaded.model_dir == str(model_dir)
    assert set(loaded.tensors) == set(named.tensors)
    assert all(torch.equal(loaded.tensors[k], named.tensors[k]) for k in named.tensors)


def test_directory_without_config_json(tmp_path):
    (tmp_path / WEIGHTS).write_bytes(b"")
    msg = load_error(tmp_path)
    assert "no config.json" in msg and str(tmp_path) in msg


def test_config_json_with_invalid_json(model_dir):
    (model_dir / "config.json").write_text('{"vocab_size": 512,')
    msg = load_error(model_dir)
    assert "config.json" in msg and "not valid JSON" in msg


def test_config_json_that_is_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2]")
    assert "JSON object" in load_error(model_dir)


def test_unsupported_architecture_is_named(model_dir):
    edit_json(model_dir / "config.json", architectures=["MistralForCausalLM"], model_type="mistral")
    msg = load_error(model_dir)
    assert "MistralForCausalLM" in msg and "'mistral'" in msg and "not supported" in msg


def test_missing_required_config_key(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["hidden_size"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert "missing hidden_size" in load_error(model_dir)


def test_missing_safetensors(model_dir):
    os.remove(model_dir / WEIGHTS)
    assert "no *.safetensors" in load_error(model_dir)


def test_unreadable_safetensors(model_dir):
    data = (model_dir / WEIGHTS).read_bytes()
    (model_dir / WEIGHTS).write_bytes(data[:len(data) // 2])
    msg = load_error(model_dir)
    assert WEIGHTS in msg and "cannot be read" in msg


def test_safetensors_missing_a_tensor_names_it(model_dir):
    edit_tensors(model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    msg = load_error(model_dir)
    assert "weights missing for model.layers.1.mlp.up_proj.weight" in msg


def test_tensor_with_wrong_shape_names_it_and_both_shapes(model_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    edit_tensors(model_dir, shrink)
    msg = load_error(model_dir)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "(16, 64)" in msg and "(32, 64)" in msg          # found, and what config.json implies


def test_heads_not_a_multiple_of_kv_heads(model_dir):
    edit_json(model_dir / "config.json", num_key_value_heads=3)
    msg = load_error(model_dir)
    assert "num_attention_heads (4)" in msg and "num_key_value_heads (3)" in msg


def test_unsupported_rope_scaling_type(model_dir):
    edit_json(model_dir / "config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    msg = load_error(model_dir)
    assert "'yarn'" in msg and "rope_scaling" in msg


def test_supported_rope_scaling_is_kept(model_dir):
    edit_json(model_dir / "config.json", rope_scaling={"type": "linear", "factor": 2.0})
    assert load_model_dir(str(model_dir)).config.rope_scaling_dict == {"type": "linear", "factor": 2.0}


def test_generation_config_eos_list_overrides_config(model_dir):
    edit_json(model_dir / "config.json", eos_token_id=2)
    edit_json(model_dir / "generation_config.json", eos_token_id=[2, 7])
    assert load_model_dir(str(model_dir)).config.eos_token_ids == (2, 7)
    edit_json(model_dir / "generation_config.json", eos_token_id=9)
    assert load_model_dir(str(model_dir)).config.eos_token_ids == (9,)


def test_generation_config_eos_stops_the_engine(model_dir):
    prompt = [1, 300, 301, 302]
    free = build_engine(str(model_dir), num_blocks=64).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    stop_at = free.token_ids[3]
    assert stop_at not in free.token_ids[:3]
    edit_json(model_dir / "generation_config.json", eos_token_id=[2, stop_at])
    out = build_engine(str(model_dir), num_blocks=64).generate([prompt], SamplingParams(max_tokens=8))[0]
    assert out.token_ids == free.token_ids[:4] and out.finish_reason.name == "STOP"


def test_corrupt_tokenizer_json_names_the_path(model_dir):
    path = model_dir / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerLoadError) as e:
        build_engine(str(model_dir), num_blocks=16)
    assert e.value.path == str(path)
    assert str(path) in str(e.value)


def test_unknown_model_name():
    with pytest.raises(ModelConfigError, match="'no-such-model'"):
        resolve_model("no-such-model")
