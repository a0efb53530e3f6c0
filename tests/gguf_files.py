"""Writes small Llama GGUF files the way llama.cpp's converter does (for the GGUF loader's tests):
HF tensors renamed, Q/K rows permuted for llama.cpp's RoPE layout, 2-D weights quantized with
gguf's own quantizer (norms stay F32), a byte-level BPE vocabulary with merges, special tokens
and a chat template in the metadata."""
from __future__ import annotations

import numpy as np
import torch

from services.engine.config import ModelConfig
from services.engine.tokenizer import _bytes_to_unicode

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")     # ids 0, 1, 2 (as SmolLM2's)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
# A few merges so that BPE has work to do: "Ġ" is the byte alphabet's space.
MERGES = ["h e", "l l", "Ġ t", "Ġt he", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]


def vocabulary(vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types): 3 control tokens, the 256 byte characters, the merges' results, fillers."""
    tokens = list(SPECIALS) + list(_bytes_to_unicode())
    types = [3] * len(SPECIALS) + [1] * 256
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
        types.append(1)
    while len(tokens) < vocab_size:
        tokens.append(f"<extra_{len(tokens)}>")
        types.append(1)
    return tokens, types


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's reorder of Q/K rows: each head's halves interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if hf in glob:
        return glob[hf]
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"


def write_llama_gguf(path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], qtype: str = "F32",
                     arch: str = "llama", add_bos: bool = False, pre: str = "smollm",
                     raw: dict[str, tuple[np.ndarray, str]] | None = None) -> dict[str, np.ndarray]:
    """Write `tensors` (HF naming) as a llama.cpp-style GGUF; 2-D weights stored as `qtype`
    (raw: per HF name, bytes stored as is with their type name instead). Returns, per HF name,
    what a correct loader must read back: the stored values dequantized by gguf, in HF row order."""
    import gguf
    from gguf.quants import dequantize, quantize

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    tokens, types = vocabulary(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    expected = {}
    for name, t in tensors.items():
        if name in (raw or {}):
            data, kind = raw[name]
            w.add_tensor(gguf_name(name), data, raw_dtype=gguf.GGMLQuantizationType[kind])
            continue
        values = t.float().numpy()
        q = gguf.GGMLQuantizationType[qtype if values.ndim == 2 else "F32"]
        # Blocks run along a row, so quantizing commutes with reordering rows: the expectation is
        # the HF-order tensor through gguf's quantizer and back.
        expected[name] = np.asarray(dequantize(quantize(values, q), q), dtype=np.float32).reshape(values.shape)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            values = llama_cpp_permute(values, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        w.add_tensor(gguf_name(name), quantize(values, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
