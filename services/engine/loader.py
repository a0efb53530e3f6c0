"""Model resolution: named models, Hugging Face directories and GGUF files.

A named random-weight model (`tiny`, `small`) is a ModelConfig plus a seed; its weights are
generated in HF naming, so `export_model` can write a directory that transformers loads and
every tool shares the exact same weights. A named real model (`smollm2-135m`) is a GGUF file in
the local model cache (services/engine/model_store.py; `make setup` fills it). A GGUF file, or a
directory holding exactly one and no config.json, is read by services/engine/gguf_loader.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import torch

from services.engine.config import ModelConfig, ModelConfigError
from services.engine.tokenizer import Tokenizer

NAMED_MODELS: dict[str, ModelConfig] = {
    # tests: fast, GQA (4 heads over 2 KV heads), vocab big enough for the byte-level tokenizer
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=2048, model_id="tiny"),
    # the benchmark model
    "small": ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
                         num_heads=8, num_kv_heads=8, max_position_embeddings=4096, model_id="small"),
}
NAMED_MODEL_SEED = 0


@dataclass
class LoadedModel:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]     # HF names → float tensors
    model_dir: str | None                # HF directory; None for a named random model or a GGUF file
    # What a GGUF file carries in its metadata (None/empty otherwise: read from model_dir or built in).
    tokenizer: Tokenizer | None = None
    chat_template: str | None = None                  # Jinja source
    chat_template_vars: dict[str, str] = field(default_factory=dict)   # bos_token, eos_token, ... as text
    model_file: str | None = None        # the GGUF file read


def random_hf_tensors(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights in HF naming (float32). Same (cfg, seed) → same tensors everywhere."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm_weight():
        return 0.8 + 0.4 * torch.rand(cfg.hidden_size, generator=g)

    t = {"model.embed_tokens.weight": normal(cfg.vocab_size, cfg.hidden_size, std=0.5)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm_weight()
        t[p + "self_attn.q_proj.weight"] = normal(cfg.q_size, cfg.hidden_size, std=0.05)
        t[p + "self_attn.k_proj.weight"] = normal(cfg.kv_size, cfg.hidden_size, std=0.05)
        t[p + "self_attn.v_proj.weight"] = normal(cfg.kv_size, cfg.hidden_size)
        t[p + "self_attn.o_proj.weight"] = normal(cfg.hidden_size, cfg.q_size)
        t[p + "post_attention_layernorm.weight"] = norm_weight()
        t[p + "mlp.gate_proj.weight"] = normal(cfg.intermediate_size, cfg.hidden_size)
        t[p + "mlp.up_proj.weight"] = normal(cfg.intermediate_size, cfg.hidden_size)
        t[p + "mlp.down_proj.weight"] = normal(cfg.hidden_size, cfg.intermediate_size)
    t["model.norm.weight"] = norm_weight()
    if not cfg.tie_word_embeddings:
        # std 0.1 gives logits with std ~2: argmax is then robust to float rounding across
        # implementations, which the golden tests against transformers rely on.
        t["lm_head.weight"] = normal(cfg.vocab_size, cfg.hidden_size, std=0.1)
    return t


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
              "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (cfg.hidden_size,),
            p + "post_attention_layernorm.weight": (cfg.hidden_size,),
            p + "self_attn.q_proj.weight": (cfg.q_size, cfg.hidden_size),
            p + "self_attn.k_proj.weight": (cfg.kv_size, cfg.hidden_size),
            p + "self_attn.v_proj.weight": (cfg.kv_size, cfg.hidden_size),
            p + "self_attn.o_proj.weight": (cfg.hidden_size, cfg.q_size),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
            p + "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
        })
    return shapes


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path} is not valid JSON ({e}); fix or re-export the {what}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} must hold a JSON object")
    return data


def read_model_dir_config(path: str) -> ModelConfig:
    """config.json plus generation_config.json's EOS ids of an HF directory (no weights read)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelConfigError(f"{path} has no config.json; pass a Hugging Face model directory, a .gguf "
                               f"file or one of the named models ({', '.join(NAMED_MODELS)}, smollm2-135m)")
    cfg = ModelConfig.from_hf(_read_json(cfg_path, "model config"), model_id=os.path.basename(os.path.normpath(path)))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        eos = _read_json(gen_path, "generation config").get("eos_token_id")
        if eos is not None:
            cfg = replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
    return cfg


def load_model_dir(path: str) -> LoadedModel:
    """Read config.json, generation_config.json and every *.safetensors of an HF directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_model_dir_config(path)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelConfigError(f"{path} has no *.safetensors weights; Tandem loads safetensors only "
                               "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(path, name)))
        except (SafetensorError, OSError) as e:
            raise ModelConfigError(f"{os.path.join(path, name)} cannot be read ({e}); re-export the model") from None
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    check_tensors(cfg, tensors, path)
    return LoadedModel(cfg, tensors, path)


def check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str,
                  mismatch: str = "the safetensors files and config.json disagree") -> None:
    """Raises ModelConfigError naming the first missing or misshapen weight; `mismatch` says what disagrees."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ModelConfigError(f"{where}: weights missing for {', '.join(missing[:3])}{more}; {mismatch}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelConfigError(f"{where}: {name} has shape {tuple(tensors[name].shape)} but the config "
                                   f"implies {shape}; {mismatch}")


def resolve_model(name_or_dir: str, weights: bool = True) -> LoadedModel:
    """A named model (`tiny`, `small`, `smollm2-135m`), a GGUF file (or a directory holding
    one), or an HF directory.

    weights=False reads only the configuration and tokenizer (tensors stays empty): what a
    router needs. Raises ModelConfigError saying what to pass (or, for a named real model
    missing from the cache, to run `make setup`).
    """
    from services.engine import gguf_loader, model_store

    if name_or_dir in NAMED_MODELS and not os.path.isdir(name_or_dir):
        cfg = NAMED_MODELS[name_or_dir]
        return LoadedModel(cfg, random_hf_tensors(cfg, NAMED_MODEL_SEED) if weights else {}, None)
    if name_or_dir in model_store.REAL_MODELS and not os.path.isdir(name_or_dir):
        return gguf_loader.load_gguf(model_store.cached_model_file(name_or_dir), model_id=name_or_dir,
                                     weights=weights)
    gguf_file = gguf_loader.find_gguf(name_or_dir)
    if gguf_file is not None:
        return gguf_loader.load_gguf(gguf_file, weights=weights)
    if not os.path.isdir(name_or_dir):
        raise ModelConfigError(f"model {name_or_dir!r} is neither a directory, a .gguf file nor a named model; use "
                               f"a Hugging Face model directory, a GGUF file or one of "
                               f"{', '.join([*NAMED_MODELS, *model_store.REAL_MODELS])}")
    if not weights:
        return LoadedModel(read_model_dir_config(name_or_dir), {}, name_or_dir)
    return load_model_dir(name_or_dir)


def export_model(loaded: LoadedModel, out_dir: str, tokenizer=None) -> None:
    """Write config.json, generation_config.json, model.safetensors and tokenizer.json."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    cfg = loaded.config
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
                   "do_sample": False}, f, indent=2)
    save_file({k: v.contiguous() for k, v in loaded.tensors.items()}, os.path.join(out_dir, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save(out_dir)
