"""Causal attention of one prefill chunk over its whole context: a bf16 C++ kernel, SDPA, or query tiles.

`prefill_attention` picks the path:

1. On a CPU with AVX512-BF16, in bfloat16 with head_dim 64 or 128: the C++ kernel
   (csrc/prefill_attention.cpp), whose QK^T and P.V are vdpbf16ps products of bf16 pairs summed in
   float32 (torch's CPU paths run QK^T as float32 matmuls: its bmm cannot take bf16 inputs into a
   float32 output); where the CPU also has AMX-BF16, the same products as AMX tile products.
2. Otherwise torch's CPU flash kernel (F.scaled_dot_product_attention), except that on the CPU in
   bfloat16, contexts of 256-1024 tokens go through `tiled_causal_attention`: the chunk's queries
   in tiles of 64, each tile one float32 batched matmul against the keys it may see, one softmax,
   one bf16 batched matmul with V.

Causal attention of `small`'s 8 heads x 64, 8 layers' worth, AMD EPYC Zen 4, quiet host, wall time
(best of 5 rounds of 8 calls), ms:

    context            128    256    512   1024   2048
    1 thread  kernel   1.2    4.0   15.1   58.6    222
              tiled    5.0   13.4   67.1    197    647
              flash    4.6   15.3   63.9    176    590
    2 threads kernel   0.7    2.9    8.3   33.2    119
              tiled    4.0   10.9   30.9   98.1    447
              flash    3.2    9.5   43.1    110    309

Intel Xeon with AMX (2 cores, 2 threads), same 8 layers, best of 5 rounds of 8 calls, ms:

    context                 512   2048
    kernel, AMX tiles       5.5   68.0
    kernel, vdpbf16ps      14.2  208.0
    flash (torch SDPA)     65.2  1891

The tiled path beats flash only for 256-1024 (beyond that its [heads, 64, context] float32 scores
outgrow the L2 cache). Every path keeps float32 scores (bf16 products are exact in float32) and
rounds the probabilities to bf16 for P @ V as the flash kernel does for bf16 inputs: all are within
bf16 rounding of a float32 reference (max |diff| ~1e-2 on unit-variance inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine import attention_ops

KERNEL_HEAD_DIMS = (64, 128)      # head sizes the C++ bf16 kernel is built for
TILE = 64
TILED_CONTEXTS = (256, 1024)      # [min, max] context lengths the tiled path takes


def use_tiled(q: torch.Tensor, ctx_len: int) -> bool:
    """Whether a chunk whose queries are `q` and whose context holds ctx_len tokens goes tiled."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and TILED_CONTEXTS[0] <= ctx_len <= TILED_CONTEXTS[1]


def bf16_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The loaded kernel module when (q, k, v) can take the C++ bf16 path, else None."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or q.shape[-1] not in KERNEL_HEAD_DIMS:
        return None
    if k.dtype != q.dtype or v.dtype != q.dtype or any(x.stride(-1) != 1 for x in (q, k, v)) or k.stride(0) % 2:
        return None
    mod = attention_ops.load_kernels()
    return mod if mod is not None and getattr(mod, "prefill_attention_bf16", False) else None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [q_len, H, D], queries at positions ctx - q_len .. ctx - 1; k, v: [ctx, Hkv, D], positions
    0 .. ctx - 1 (any strides). Each query attends to the keys at or before its position.
    Returns [q_len, H, D] in q's dtype. H must be a multiple of Hkv (GQA)."""
    q_len, ctx = q.shape[0], k.shape[0]
    mod = bf16_kernel(q, k, v)
    if mod is not None:
        out = torch.empty(q.shape, dtype=q.dtype)                                 # [q_len, H, D]
        mod.prefill_attention(out, q, k, v, scale)
        return out
    if use_tiled(q, ctx):
        return tiled_causal_attention(q, k, v, scale)
    if q_len == ctx:
        mask, causal = None, True
    else:
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        mask, causal = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None], False   # [q_len, ctx]
    # 4-D inputs: torch's CPU flash kernel takes them; 3-D ones fall back to the math path.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
        is_causal=causal, scale=scale, enable_gqa=True)                           # [1, H, q_len, D]
    return out[0].transpose(0, 1)


def tiled_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           tile: int = TILE) -> torch.Tensor:
    """prefill_attention's contract, computed in query tiles of batched matmuls (any device/dtype)."""
    q_len, num_heads, d = q.shape
    ctx, num_kv = k.shape[0], k.shape[1]
    g = num_heads // num_kv
    start = ctx - q_len                                  # position of the first query
    # Rows of a KV head's batch entry are (query, one of the G heads sharing it): a tile of queries
    # is then a contiguous run of rows.
    qf = torch.empty(num_kv, q_len, g, d, dtype=torch.float32, device=q.device)
    qf.copy_(q.view(q_len, num_kv, g, d).transpose(0, 1))                                       # [Hkv, q_len, G, D]
    kt = torch.empty(num_kv, d, ctx, dtype=torch.float32, device=q.device).copy_(k.permute(1, 2, 0))  # [Hkv, D, ctx]
    vh = v.transpose(0, 1).contiguous()                                                           # [Hkv, ctx, D]
    out = torch.empty(q_len, num_kv, g, d, dtype=q.dtype, device=q.device)
    neg_inf = float("-inf")
    for s in range(0, q_len, tile):
        e = min(q_len, s + tile)
        n, see = e - s, start + e                        # rows in the tile; keys [0, see) are visible to some row
        scores = torch.bmm(qf[:, s:e].view(num_kv, n * g, d), kt[:, :, :see]).mul_(scale)       # [Hkv, n*G, see]
        # Only the last n keys can be in a row's future: query s+i sees keys < start + s + i + 1.
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1).view(n, 1, n)   # [n, 1, n]
        scores.view(num_kv, n, g, see)[..., see - n:].masked_fill_(future, neg_inf)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[s:e] = torch.bmm(probs, vh[:, :see]).view(num_kv, n, g, d).transpose(0, 1)          # [n, Hkv, G, D]
    return out.view(q_len, num_heads, d)
