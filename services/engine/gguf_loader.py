"""Llama-architecture GGUF files (llama.cpp's format) → a LoadedModel in Hugging Face naming.

Read through the `gguf` package (llama.cpp's own reader and numpy dequantizers). At load:

- the model config comes from the `llama.*` metadata (layers, hidden, heads, KV heads, head
  size, FFN size, context, RoPE base and linear scaling, RMSNorm epsilon), the vocabulary size
  from the embedding's rows, tied embeddings from the absence of `output.weight`;
- every weight is dequantized to float32 (the engine casts to its dtype when it copies them in);
- Q and K projections are un-permuted: llama.cpp's converter reorders each head's rows so that
  its RoPE rotates adjacent pairs (x[2i], x[2i+1]); transformers and this engine rotate halves
  (x[i], x[i + d/2]). GGUF row 2i of a head is HF row i, GGUF row 2i+1 is HF row d/2 + i;
- the tokenizer, EOS ids and chat template come from the `tokenizer.*` metadata
  (services/engine/gguf_tokenizer.py).

What cannot be served (another architecture, a tensor type outside SUPPORTED_TENSOR_TYPES, a
partial rotary dimension, llama3 RoPE factors) raises ModelConfigError naming it and what is
supported.
"""
from __future__ import annotations

import functools
import os
import re

from typing import TYPE_CHECKING

import numpy as np
import torch

from services.engine.config import ModelConfig, ModelConfigError

if TYPE_CHECKING:
    from services.engine.loader import LoadedModel

SUPPORTED_ARCHITECTURES = ("llama",)
# Types dequantized by gguf.quants, each checked against gguf's own quantizer in
# tests/unit/test_gguf_loader.py.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")

_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def find_gguf(path: str) -> str | None:
    """The GGUF file `path` names: the path itself when it is a .gguf file, the single .gguf in a
    directory without config.json; None when `path` is neither. Raises ModelConfigError for a
    directory holding several."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise ModelConfigError(f"{path} holds {len(found)} GGUF files ({', '.join(found)}); pass one of them "
                               "as --model DIR/FILE.gguf")
    return os.path.join(path, found[0]) if found else None


def open_gguf(path: str):
    """A gguf.GGUFReader (memory-mapped; nothing is dequantized yet) and its metadata as a dict.
    Cached per file version: gguf's reader takes seconds on a 49k-token vocabulary, and a router
    reads the same file for its tokenizer and its chat template."""
    st = os.stat(path)
    return _open_gguf(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:
        raise ModelConfigError(f"{path} cannot be read as a GGUF file ({e}); pass a llama.cpp .gguf model") from None
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return reader, meta


def gguf_model_config(meta: dict, tensor_shapes: dict[str, tuple[int, ...]], where: str,
                      model_id: str) -> ModelConfig:
    """The ModelConfig of a llama GGUF. tensor_shapes: GGUF tensor name → shape in torch order."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(f"{where}: architecture {arch!r} is not supported; Tandem serves GGUF files of "
                               f"architecture {', '.join(map(repr, SUPPORTED_ARCHITECTURES))} (Llama, SmolLM, "
                               "TinyLlama, Mistral 7B style)")

    def key(name: str, default=None, required: bool = True):
        value = meta.get(f"{arch}.{name}", default)
        if value is None and required:
            raise ModelConfigError(f"{where} is missing the metadata key {arch}.{name}; re-convert it with a recent "
                                   "llama.cpp convert_hf_to_gguf.py")
        return value

    if key("expert_count", 0, required=False):
        raise ModelConfigError(f"{where}: a mixture-of-experts model ({key('expert_count')} experts) is not "
                               "supported; Tandem serves dense Llama models")
    if "rope_freqs.weight" in tensor_shapes:
        raise ModelConfigError(f"{where} carries rope_freqs (Llama 3.1-style RoPE scaling factors), which is not "
                               "supported from GGUF; serve the Hugging Face directory of this model instead")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads, required=False))
    rope_dim = int(key("rope.dimension_count", head_dim, required=False))
    if rope_dim != head_dim:
        raise ModelConfigError(f"{where}: RoPE over {rope_dim} of {head_dim} head dimensions (partial rotary) is "
                               "not supported")
    scaling_type = key("rope.scaling.type", "none", required=False)
    if scaling_type not in ("none", "linear"):
        raise ModelConfigError(f"{where}: RoPE scaling {scaling_type!r} is not supported from GGUF; supported: "
                               "none, linear")
    rope_scaling = (("factor", float(key("rope.scaling.factor"))), ("rope_type", "linear")) \
        if scaling_type == "linear" else ()
    if "token_embd.weight" not in tensor_shapes:
        raise ModelConfigError(f"{where} has no token_embd.weight tensor; it is not a complete model")
    from services.engine.gguf_tokenizer import gguf_eos_ids

    return ModelConfig(
        vocab_size=tensor_shapes["token_embd.weight"][0], hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
        num_heads=heads, num_kv_heads=int(key("attention.head_count_kv", heads, required=False)),
        max_position_embeddings=int(key("context_length")), head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5, required=False)),
        rope_theta=float(key("rope.freq_base", 10000.0, required=False)), rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=gguf_eos_ids(meta), model_id=model_id)


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a llama GGUF tensor name; None when it is not part of a Llama model."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_NAME.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of a Q or K projection (see the module docstring).
    w: [n_heads * head_dim, in] → same shape, HF row order."""
    d = w.shape[0] // n_heads
    # [heads, d/2, 2, in] → [heads, 2, d/2, in]: GGUF rows (2i, 2i+1) become HF rows (i, d/2 + i)
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantized(tensor, where: str) -> torch.Tensor:
    """A gguf ReaderTensor as a float32 torch tensor in torch dimension order."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise ModelConfigError(f"{where}: tensor {tensor.name} is of type {kind}, which is not supported; "
                               f"supported types: {', '.join(SUPPORTED_TENSOR_TYPES)} (re-quantize with llama.cpp's "
                               "llama-quantize to one of them)")
    values = dequantize(tensor.data, tensor.tensor_type)     # float32, shape = reversed GGUF dims
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    if np.may_share_memory(values, tensor.data):              # F32: a view of the mapped file; own a copy
        values = values.copy()
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def load_gguf(path: str, model_id: str | None = None, weights: bool = True) -> "LoadedModel":
    """A LoadedModel from a llama GGUF file: config, tokenizer and chat template from its
    metadata, and (weights=True) every tensor dequantized to float32 in HF naming.
    Raises ModelConfigError for a file Tandem cannot serve (the message names why)."""
    from services.engine.gguf_tokenizer import gguf_special_tokens, gguf_tokenizer
    from services.engine.loader import LoadedModel, check_tensors

    reader, meta = open_gguf(path)
    where = path
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    model_id = model_id or os.path.splitext(os.path.basename(path))[0]
    cfg = gguf_model_config(meta, shapes, where, model_id)
    unknown = sorted(name for name in shapes if hf_name(name) is None)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ModelConfigError(f"{where} has tensors a Llama model does not: {', '.join(unknown[:3])}{more}")
    # Shapes and types are checked before anything is dequantized (meta tensors hold no memory).
    check_tensors(cfg, {hf_name(n): torch.empty(s, device="meta") for n, s in shapes.items()}, where,
                  mismatch="the GGUF tensors and its llama.* metadata disagree")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            dequantized(t, where)                 # raises, naming the type
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors if weights else ():
        name, w = hf_name(t.name), dequantized(t, where)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        tensors[name] = w
    return LoadedModel(cfg, tensors, None, tokenizer=gguf_tokenizer(meta, where),
                       chat_template=meta.get("tokenizer.chat_template"),
                       chat_template_vars=gguf_special_tokens(meta), model_file=path)
