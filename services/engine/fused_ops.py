"""The decoder's elementwise ops, fused on the CPU (csrc/fused_ops.cpp), plain torch elsewhere.

Each function has one contract and two paths: the fused C++ op (CPU tensors, float32/bfloat16,
the CPU kernel module loaded) and the torch ops it replaces (any other device or dtype, or no
kernel: TANDEM_DISABLE_KERNELS=1, a failed build). Both round as Hugging Face's Llama does
(normalise in float32, cast, then scale; bf16 rounding after every elementwise product), so the
fused path moves no greedy token: bf16 outputs are bit-identical to the torch path and float32
ones differ in the last bit of a sum at most.

Why: at batch 1-8 a decode step's norms, residual adds, RoPE and SiLU-mul are tiny, and torch's
per-op dispatch (4-6 ops each, ~2-5 us per op, 100+ ops per step) cost more than their arithmetic.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from services.engine import attention_ops

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _kernels(x: torch.Tensor):
    """The loaded CPU kernel module when `x` can take the fused path, else None."""
    if x.device.type != "cpu" or x.dtype not in _FUSED_DTYPES:
        return None
    mod = attention_ops.load_kernels()
    return mod if mod is not None and hasattr(mod, "rms_norm") else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, n] → weight * RMSNorm(x) [T, n] in x's dtype (x is not modified)."""
    mod = _kernels(x)
    if mod is None or weight.dtype != x.dtype:
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    out = torch.empty_like(x)
    mod.rms_norm(out, x, weight, eps)
    return out


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta IN PLACE (rounded to its dtype); returns weight * RMSNorm(residual).

    residual: [T, n] (written), delta: [T, n] same dtype. The caller must own `residual`.
    """
    mod = _kernels(residual)
    if mod is None or weight.dtype != residual.dtype or delta.dtype != residual.dtype or delta.stride(-1) != 1:
        residual.add_(delta)
        return weight * F.rms_norm(residual.float(), (residual.shape[-1],), eps=eps).to(residual.dtype)
    out = torch.empty_like(residual)
    mod.add_rms_norm(out, residual, delta, weight, eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] = [gate | up] → silu(gate) * up: [T, I].

    One pass on the CPU where the kernel module runs torch's own vector exp (AVX2 / AVX-512
    builds): the same bits as torch's two ops, without the intermediate tensor. The scalar build's
    exp is slower than torch's vectorised SiLU, so there torch's ops run.
    """
    mod = _kernels(gate_up)
    if mod is None or not getattr(mod, "silu_mul_vectorized", False) or gate_up.stride(-1) != 1:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    out = torch.empty(gate_up.shape[0], gate_up.shape[-1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    mod.silu_mul(out, gate_up)
    return out


def write_kv_rows(kv_rows: torch.Tensor, rows: torch.Tensor, kv_new: torch.Tensor) -> None:
    """kv_rows[rows[a, t]] = kv_new[t, a] for a in (K, V): every new token's K and V into its slot.

    kv_rows: [R, W] view of the KV tensor (written); rows: int64 [2, T]; kv_new: [T, 2, W] (a view
    of the fused projection: W contiguous).
    """
    mod = _kernels(kv_rows)
    if mod is None or kv_new.stride(-1) != 1 or kv_rows.stride(-1) != 1 or rows.dtype != torch.int64:
        kv_rows.index_put_((rows,), kv_new.transpose(0, 1))
        return
    mod.write_kv_rows(kv_rows, rows, kv_new)


@functools.lru_cache(maxsize=None)
def _blocked_by_byte(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: bit j of byte value i is 0 (LSB first)."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (bits == 0).to(device)


def mask_tokens_(x: torch.Tensor, bits: torch.Tensor) -> None:
    """x: [n, V] float32 logits (written); bits: [n, ceil(V/32)] int32, token t allowed when bit
    t % 32 of word t // 32 is set (llguidance's layout). Disallowed entries become -inf in place."""
    mod = _kernels(x)
    if mod is not None and x.dtype == torch.float32 and x.stride(-1) == 1 and bits.device == x.device:
        mod.mask_tokens_(x, bits.contiguous())
        return
    n, vocab = x.shape
    b = bits.to(x.device, non_blocking=True).view(torch.uint8).long()                       # [n, 4W]
    x.masked_fill_(_blocked_by_byte(x.device)[b].view(n, -1)[:, :vocab], float("-inf"))   # [n, V] bool


class Rotary:
    """RoPE for one step: positions [T] int64 plus the float32 tables [max_pos, D/2].

    `rotate_(x)` rotates x: [T, heads, D] (rows may be strided, D contiguous) in place, in HF's
    rotate_half convention, with cos/sin rounded to x's dtype first as HF does.
    """

    def __init__(self, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor):
        self.positions, self.cos_table, self.sin_table = positions, cos_table, sin_table
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, 1, D/2] in `dtype` (computed once per step and dtype)."""
        if dtype not in self._tables:
            self._tables[dtype] = (self.cos_table[self.positions].to(dtype).unsqueeze(1),
                                   self.sin_table[self.positions].to(dtype).unsqueeze(1))
        return self._tables[dtype]

    def rotate_(self, x: torch.Tensor) -> None:
        mod = _kernels(x)
        if mod is not None and x.stride(-1) == 1 and self.positions.dtype == torch.int64:
            mod.rope_(x, self.positions.contiguous(), self.cos_table, self.sin_table)
            return
        cos, sin = self._cos_sin(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated)
