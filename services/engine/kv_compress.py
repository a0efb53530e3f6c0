"""Preempted requests' KV kept in int8 instead of dropped (issue 16, item 3), and restored on resume.

A request preempted by compression gives its blocks back to the pool at once, as a recomputing one
does, but its KV is first copied out in int8: one scale per (token, head) of each layer's K and V,
the absolute maximum over head_dim ÷ 127 (a scale per whole block let one outlier channel of K
flatten every other value of its block). The copy is about 53% of a bf16 block (64 int8 values
and one fp32 scale per token and head at head_dim 64). When the request is admitted again its
blocks are allocated and the copy dequantized into them before the step's forward, so it goes on
decoding where it stopped instead of recomputing prompt + output.

Restored KV is lossy: greedy tokens after a restore may differ from an uncompressed run
(benchmarks/bench_kv_compress.py measures how often and how far in). Restored blocks are never
registered in the prefix cache, so no other request reuses them as exact.

    store = CompressedStore(budget_bytes, bytes_per_block)
    if store.reserve(rid, num_blocks, num_tokens):          # the scheduler, at preemption
        ...                                                 # the runner, before the forward:
        store.fill(rid, compress_blocks(kv, block_ids))     #   copy out (the blocks are still intact)
    entry = store.take(rid)                                 # the scheduler, at re-admission
    restore_blocks(kv, entry.data, block_ids, skip)         # the runner, before the forward

Pure bookkeeping here plus two tensor functions; the scheduler decides, the runner copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = 127.0


@dataclass
class CompressedKV:
    """A request's blocks in int8. q: [n, L, 2, bs, H, D] int8; scale: [n, L, 2, bs, H, 1] float32."""
    q: torch.Tensor
    scale: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.q.shape[0]

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


def compressed_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one block takes in CompressedKV: int8 values and a float32 scale per token and head."""
    return 2 * num_layers * block_size * num_kv_heads * (head_dim + 4)


def compress_blocks(kv: torch.Tensor, block_ids: list[int]) -> CompressedKV:
    """int8 copy of kv[block_ids] (kv: [num_blocks, L, 2, bs, H, D], any float dtype)."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=kv.device)
    x = kv.index_select(0, ids).float()                                     # [n, L, 2, bs, H, D]
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / QMAX      # [n, L, 2, bs, H, 1]
    q = torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return CompressedKV(q, scale)


def restore_blocks(kv: torch.Tensor, data: CompressedKV, block_ids: list[int], skip: int = 0) -> None:
    """kv[block_ids[i]] = dequantized data block skip + i, for every i. The first `skip` blocks of
    the compressed request came back from the prefix cache with exact KV and are left alone."""
    if not block_ids:
        return
    if skip + len(block_ids) > data.num_blocks:
        raise ValueError(f"restore of {len(block_ids)} blocks after {skip} skipped, but only "
                         f"{data.num_blocks} were compressed")
    part = slice(skip, skip + len(block_ids))
    x = (data.q[part].float() * data.scale[part]).to(kv.dtype)              # [n, L, 2, bs, H, D]
    kv.index_copy_(0, torch.tensor(block_ids, dtype=torch.long, device=kv.device), x)


@dataclass
class _Entry:
    num_blocks: int
    num_tokens: int                 # computed tokens the copy covers
    nbytes: int
    data: CompressedKV | None = None    # None between reserve and fill


class CompressedStore:
    """Compressed copies of preempted requests, within a byte budget (0: compression off).

    reserve() counts a copy's bytes at decision time, so the budget holds before the runner has
    made it; every reserved id leaves by take() (restored) or drop() (the request ended, or its
    copy is not wanted any more)."""

    def __init__(self, budget_bytes: int, bytes_per_block: int):
        if budget_bytes < 0 or bytes_per_block <= 0:
            raise ValueError("budget_bytes must be >= 0 and bytes_per_block > 0")
        self.budget_bytes, self.bytes_per_block = budget_bytes, bytes_per_block
        self._entries: dict[str, _Entry] = {}
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def ids(self) -> list[str]:
        return list(self._entries)

    def entry_bytes(self, request_id: str) -> int:
        return self._entries[request_id].nbytes

    def room_for(self, num_blocks: int) -> bool:
        return self.bytes_used + num_blocks * self.bytes_per_block <= self.budget_bytes

    def reserve(self, request_id: str, num_blocks: int, num_tokens: int) -> bool:
        """Count a copy of num_blocks blocks (covering num_tokens computed tokens); False when
        it does not fit in the budget, or the request already has one."""
        if request_id in self._entries or num_blocks <= 0 or not self.room_for(num_blocks):
            return False
        nbytes = num_blocks * self.bytes_per_block
        self._entries[request_id] = _Entry(num_blocks, num_tokens, nbytes)
        self.bytes_used += nbytes
        return True

    def fill(self, request_id: str, data: CompressedKV) -> None:
        """Attach the copy reserved for request_id (dropped meanwhile: the copy is discarded)."""
        entry = self._entries.get(request_id)
        if entry is not None:
            if data.num_blocks != entry.num_blocks:
                raise ValueError(f"{request_id!r}: {data.num_blocks} blocks compressed, {entry.num_blocks} reserved")
            entry.data = data

    def num_tokens(self, request_id: str) -> int:
        """Computed tokens the request's copy covers (0: it has none)."""
        entry = self._entries.get(request_id)
        return entry.num_tokens if entry is not None else 0

    def take(self, request_id: str) -> tuple[int, CompressedKV | None]:
        """Remove the request's copy: (tokens it covers, data). Data is None only when take()
        comes in the same step as reserve() (the scheduler never does that)."""
        entry = self._entries.pop(request_id)
        self.bytes_used -= entry.nbytes
        return entry.num_tokens, entry.data

    def drop(self, request_id: str) -> None:
        """Forget the request's copy, if any."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self.bytes_used -= entry.nbytes
