"""Staging buffers: a request's blocks of one layer group, packed contiguously, and back.

The cache is ``kv: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``. A frame
moves blocks ``ids`` of layers ``[l0, l1)``; its staging buffer is

    staging: [len(ids), l1 - l0, 2, block_size, num_kv_heads, head_dim]   (contiguous)

whose bytes are exactly the tcp wire payload: ``kv[ids[0], l0:l1]``, then ``kv[ids[1], l0:l1]``, …
Device transports (nccl) gather into it on the sender, move it whole, and scatter it into the
receiver's own block ids. Works for any device; nothing here synchronises.
"""
from __future__ import annotations

import torch


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)


def staging_shape(kv: torch.Tensor, num_blocks: int, layer_start: int, layer_end: int) -> tuple[int, ...]:
    """Shape of the staging buffer for ``num_blocks`` blocks of layers [layer_start, layer_end)."""
    _, _, two, bs, heads, dim = kv.shape
    return (num_blocks, layer_end - layer_start, two, bs, heads, dim)


def _check(kv: torch.Tensor, ids: list[int], layer_start: int, layer_end: int) -> None:
    if kv.dim() != 6:
        raise ValueError(f"kv must be [blocks, layers, 2, block_size, kv_heads, head_dim], got {tuple(kv.shape)}")
    if not 0 <= layer_start < layer_end <= kv.shape[1]:
        raise ValueError(f"layers [{layer_start}, {layer_end}) are not a range within [0, {kv.shape[1]})")
    if any(not 0 <= b < kv.shape[0] for b in ids):
        raise ValueError(f"a block id in {ids} is out of range 0..{kv.shape[0] - 1}")


def gather_blocks(kv: torch.Tensor, ids: list[int], layer_start: int, layer_end: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``kv[ids, layer_start:layer_end]`` packed into a new (or the given contiguous ``out``) buffer.

    Returns staging: [len(ids), layer_end - layer_start, 2, block_size, kv_heads, head_dim], on
    kv's device, in kv's dtype. Raises ValueError for ids or layers out of range or a wrong ``out``.
    """
    _check(kv, ids, layer_start, layer_end)
    shape = staging_shape(kv, len(ids), layer_start, layer_end)
    if out is None:
        out = torch.empty(shape, dtype=kv.dtype, device=kv.device)
    elif tuple(out.shape) != shape or out.dtype != kv.dtype or not out.is_contiguous():
        raise ValueError(f"staging buffer {tuple(out.shape)} {out.dtype} does not fit {shape} {kv.dtype}")
    torch.index_select(kv[:, layer_start:layer_end], 0, _index(ids, kv.device), out=out)
    return out


def scatter_blocks(kv: torch.Tensor, ids: list[int], layer_start: int, layer_end: int,
                   staging: torch.Tensor) -> None:
    """Write staging[i] into ``kv[ids[i], layer_start:layer_end]`` (the inverse of gather_blocks).

    ``staging`` may live on another device (it is copied over first). Raises ValueError for ids
    or layers out of range, repeated ids, or a staging buffer of another shape or dtype.
    """
    _check(kv, ids, layer_start, layer_end)
    shape = staging_shape(kv, len(ids), layer_start, layer_end)
    if tuple(staging.shape) != shape or staging.dtype != kv.dtype:
        raise ValueError(f"staging buffer {tuple(staging.shape)} {staging.dtype} does not fit {shape} {kv.dtype}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"block ids {ids} repeat: two staged blocks would land in one")
    if staging.device != kv.device:
        staging = staging.to(kv.device, non_blocking=True)
    kv[:, layer_start:layer_end].index_copy_(0, _index(ids, kv.device), staging)


def as_bytes(staging: torch.Tensor) -> torch.Tensor:
    """The staging buffer as a flat uint8 tensor sharing its memory (what goes on the wire)."""
    return staging.reshape(-1).view(torch.uint8)
