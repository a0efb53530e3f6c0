"""Llama-architecture decoder over a paged KV cache.

KV cache layout (owned by the runner, indexed by block ids from kv_cache.KVCacheManager):
    kv: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
One block holds every layer's K and V for block_size positions, so a request's blocks for a
group of layers l0:l1 are `kv[block_ids, l0:l1]`: one contiguous run per block. That is what the
KV transfer and live migration copy out and in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from services.engine import attention_ops, fused_ops
from services.engine.config import ModelConfig
from services.engine.prefill_attention import prefill_attention
from services.engine.rope import RotaryEmbedding


@dataclass
class PrefillSeq:
    """One request's prefill chunk inside the flattened batch."""
    q_start: int                 # first row of this chunk in the flattened tokens
    q_len: int                   # tokens computed this step
    ctx_len: int                 # tokens of context after this step (cached + q_len)
    block_ids: torch.Tensor      # [ceil(ctx_len / block_size)] int64, the request's blocks


@dataclass
class LayeredRows:
    """A layered prefill chunk in a step (scheduler.LayerGroup): rows [start, T), always the last
    rows, go through layers [first, end) only; the other rows go through every layer."""
    start: int
    first: int
    end: int
    hidden_in: torch.Tensor | None          # [T - start, hidden]: their residual stream after `first` layers (None at 0)
    hidden_out: torch.Tensor | None = None  # set by LlamaModel.forward when end < num_layers: the same after `end`


@dataclass
class AttentionMetadata:
    """Everything attention needs besides the activations. Decode rows come first.

    Every tensor lives where the model runs (the runner builds them on the host and moves them).
    """
    slot_blocks: torch.Tensor        # [T] int64: block id each new token's K/V goes to
    slot_offsets: torch.Tensor       # [T] int64: offset inside that block
    num_decode: int                  # rows [0, num_decode) are single-token decodes
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] int32 on CPU (the kernel's), int64 elsewhere
    decode_seq_lens: torch.Tensor      # [num_decode] int32 / int64 likewise: context incl. the current token
    prefills: list[PrefillSeq]
    decode_max_len: int = 0          # max(decode_seq_lens) as a host int (0 without decodes)
    layered: LayeredRows | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as HF (normalise in float32, cast back, then scale).
        return fused_ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """residual += delta in place, then this norm of it (one pass on the CPU)."""
        return fused_ops.add_rms_norm(residual, delta, self.weight, self.eps)


@dataclass
class StepTensors:
    """What every layer of one step shares, built once per step by LlamaModel.forward."""
    rotary: fused_ops.Rotary
    kv_rows: torch.Tensor      # [num_blocks * num_layers * 2 * block_size, Hkv * D]: a view of the KV tensor
    slot_rows: torch.Tensor    # [num_layers, 2, T] int64: the kv_rows row of each new token's K (0) and V (1)
    meta: AttentionMetadata


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, h: torch.Tensor, step: StepTensors, k_cache: torch.Tensor,
                v_cache: torch.Tensor, next_norm: RMSNorm | None) -> torch.Tensor | None:
        """x: [T, hidden], the residual stream, which this layer updates IN PLACE; h: this layer's
        input_layernorm(x). Returns next_norm(x) as updated (the next layer's h: the residual add and
        the norm are one pass), or None when next_norm is None (x is still updated).

        k_cache, v_cache: [num_blocks, block_size, Hkv, D], this layer's views of the KV tensor.
        """
        cfg, meta = self.cfg, step.meta
        t = x.shape[0]
        qkv = self.qkv_proj(h)                                                   # [T, q + 2kv]
        # q and k are adjacent heads of one tensor: rotate them in a single pass, in place.
        qk = qkv[:, :cfg.q_size + cfg.kv_size].view(t, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        step.rotary.rotate_(qk)                                                  # [T, H + Hkv, D]
        q = qk[:, :cfg.num_heads]                                                # [T, H, D]
        # K and V of every new token in one write: rows [2, T] of the KV tensor's [*, Hkv * D] view.
        fused_ops.write_kv_rows(step.kv_rows, step.slot_rows[self.layer_idx], qkv[:, cfg.q_size:].view(t, 2, cfg.kv_size))
        nd = meta.num_decode
        if nd == t:                    # decodes only: the kernel's output is the attention output
            attn = attention_ops.paged_decode_attention(
                q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, self.scale, meta.decode_max_len)
        else:
            attn = torch.empty_like(q)                                           # [T, H, D]
            if nd:
                attn[:nd] = attention_ops.paged_decode_attention(
                    q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, self.scale,
                    meta.decode_max_len)
            k = qk[:, cfg.num_heads:]                                            # [T, Hkv, D]
            v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, cfg.num_kv_heads, cfg.head_dim)
            for p in meta.prefills:
                rows = slice(p.q_start, p.q_start + p.q_len)
                attn[rows] = self._prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, p)
        h = self.post_attention_layernorm.add_forward(x, self.o_proj(attn.view(t, cfg.q_size)))
        mlp = self.down_proj(fused_ops.silu_mul(self.gate_up_proj(h)))
        if next_norm is None:
            x.add_(mlp)
            return None
        return next_norm.add_forward(x, mlp)

    def _prefill_attention(self, q, k_new, v_new, k_cache, v_cache, p: PrefillSeq) -> torch.Tensor:
        """q: [q_len, H, D] → [q_len, H, D]; attends causally to the request's whole context."""
        if p.ctx_len == p.q_len:       # nothing cached before this chunk: use the new K/V directly
            k, v = k_new, v_new
        else:
            k = k_cache.index_select(0, p.block_ids).flatten(0, 1)[:p.ctx_len]   # [ctx, Hkv, D]
            v = v_cache.index_select(0, p.block_ids).flatten(0, 1)[:p.ctx_len]
        return prefill_attention(q, k, v, self.scale)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary: RotaryEmbedding | None = None
        self._kv_views: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def init_rotary(self, device) -> None:
        self.rotary = RotaryEmbedding(self.cfg, device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                meta: AttentionMetadata, logits_indices: torch.Tensor, on_layer_done=None) -> torch.Tensor:
        """input_ids, positions: [T] → logits [len(logits_indices), vocab] in the model dtype.

        kv: the contiguous [num_blocks, num_layers, 2, block_size, Hkv, D] KV tensor (written).
        on_layer_done(i), when given, runs after layer i wrote its K/V into `kv` (the prefill side
        streams KV to the decode side from there while later layers compute).
        """
        step = StepTensors(fused_ops.Rotary(positions, self.rotary.cos, self.rotary.sin),
                           kv.view(-1, self.cfg.kv_size), self._slot_rows(kv, meta), meta)
        caches = self._layer_caches(kv)
        t, lay, last = input_ids.shape[0], meta.layered, len(self.layers) - 1
        # Rows sampled = every row (a step of decodes only): the last layer's residual add carries
        # the final norm too, and no row is gathered.
        all_rows = logits_indices.shape[0] == t and (lay is None or lay.end == len(self.layers))
        x = self.embed_tokens(input_ids)                                     # [T, hidden], updated in place
        if lay is None:
            h = self.layers[0].input_layernorm(x)
            for i, layer in enumerate(self.layers):
                next_norm = self.layers[i + 1].input_layernorm if i < last else (self.norm if all_rows else None)
                h = layer(x, h, step, *caches[i], next_norm)
                if on_layer_done is not None:
                    on_layer_done(i)
        else:
            h = self._layered_layers(x, step, caches, lay, all_rows, on_layer_done)
        if not all_rows:
            h = self.norm(x[logits_indices])
        return self.lm_head(h)

    def _layered_layers(self, x: torch.Tensor, step: StepTensors, caches, lay: LayeredRows, all_rows: bool,
                        on_layer_done) -> torch.Tensor | None:
        """The layer loop of a step with a layered chunk: rows [0, lay.start) through every layer,
        rows [lay.start, T) through layers [lay.first, lay.end) only (x: [T, hidden], updated in place).
        Returns the final norm of every row when all_rows, else None."""
        t, head, last = x.shape[0], lay.start, len(self.layers) - 1
        if lay.hidden_in is not None:
            x[head:] = lay.hidden_in
        m = step.meta
        head_meta = dataclasses.replace(m, slot_blocks=m.slot_blocks[:head], slot_offsets=m.slot_offsets[:head],
                                        prefills=[p for p in m.prefills if p.q_start < head], layered=None)
        head_step = StepTensors(fused_ops.Rotary(step.rotary.positions[:head], self.rotary.cos, self.rotary.sin),
                                step.kv_rows, step.slot_rows[:, :, :head], head_meta)

        def rows(i: int) -> int:
            return t if lay.first <= i < lay.end else head

        h = self.layers[0].input_layernorm(x[:rows(0)]) if rows(0) else None
        for i, layer in enumerate(self.layers):
            n = rows(i)
            n_next = rows(i + 1) if i < last else n
            if i == last:
                next_norm = self.norm if all_rows else None
            else:                        # the rows grow at lay.first: their norm is taken after the layer
                next_norm = self.layers[i + 1].input_layernorm if n_next <= n else None
            if n:                        # (no rows: a layered chunk alone in its step, before its first layer)
                h = layer(x[:n], h, step if n == t else head_step, *caches[i], next_norm)
                if on_layer_done is not None:
                    on_layer_done(i)
            if n_next > n:
                h = self.layers[i + 1].input_layernorm(x[:n_next])
            elif n_next < n:             # the layered rows stop here until the next step
                lay.hidden_out = x[head:].clone()
                h = h[:n_next]
        return h

    def _slot_rows(self, kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[num_layers, 2, T] int64: the row of kv.view(-1, Hkv * D) each new token's K and V go to."""
        _, nl, two, bs = kv.shape[:4]
        layer_kv = torch.arange(nl * two, device=kv.device).view(nl, two, 1) * bs          # [L, 2, 1]
        return layer_kv + (meta.slot_blocks * (nl * two * bs) + meta.slot_offsets)           # [L, 2, T]

    def _layer_caches(self, kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (k_cache, v_cache) views [num_blocks, block_size, Hkv, D] of kv, made once per KV tensor."""
        if self._kv_views is None or self._kv_views[0] is not kv:
            self._kv_views = (kv, [(kv[:, i, 0], kv[:, i, 1]) for i in range(len(self.layers))])
        return self._kv_views[1]

    def load_hf_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors (model.layers.N.self_attn.q_proj.weight, ...) into fused weights."""
        with torch.no_grad():
            self.embed_tokens.weight.copy_(tensors["model.embed_tokens.weight"])
            self.norm.weight.copy_(tensors["model.norm.weight"])
            if not self.cfg.tie_word_embeddings:
                self.lm_head.weight.copy_(tensors["lm_head.weight"])
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.input_layernorm.weight.copy_(tensors[p + "input_layernorm.weight"])
                layer.post_attention_layernorm.weight.copy_(tensors[p + "post_attention_layernorm.weight"])
                layer.qkv_proj.weight.copy_(torch.cat([tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
                layer.o_proj.weight.copy_(tensors[p + "self_attn.o_proj.weight"])
                layer.gate_up_proj.weight.copy_(
                    torch.cat([tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"]]))
                layer.down_proj.weight.copy_(tensors[p + "mlp.down_proj.weight"])
