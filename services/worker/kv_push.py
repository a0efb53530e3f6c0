"""Prefill side: push each layer group of each prefill chunk to its decode instance as soon as
the model has written it, so the transfer overlaps the rest of the prefill.

Runs on the engine thread as LLMEngine.on_prefill_layer. A chunk covers positions
[s, e) = [num_computed_tokens, + num_new_tokens); after layer l finishes a group [l0, l] the
request's logical blocks [s // block_size, ceil(e / block_size)) are pushed for those layers.
The first chunk seen also pushes the blocks before s (a prefix-cache hit the chunk did not
compute). A block split across two chunks is pushed twice; frames apply in order, so the
receiver ends with the complete block.
"""
from __future__ import annotations

import threading

from services.engine.scheduler import ScheduledChunk


class PrefillPusher:
    def __init__(self, block_table, block_size: int, num_layers: int, layer_group: int):
        """block_table: request_id → its physical block ids (KVCacheManager.block_table)."""
        if layer_group <= 0:
            raise ValueError(f"layer_group must be positive, got {layer_group}")
        self._block_table, self._bs = block_table, block_size
        self._num_layers, self._group = num_layers, min(layer_group, num_layers)
        self._lock = threading.Lock()
        self._transfers: dict[str, list] = {}     # request_id → [transfer, first chunk start or None]

    def register(self, request_id: str, transfer) -> None:
        with self._lock:
            self._transfers[request_id] = [transfer, None]

    def unregister(self, request_id: str) -> None:
        """After this returns no further push for the request starts."""
        with self._lock:
            self._transfers.pop(request_id, None)

    def __call__(self, prefills: list[ScheduledChunk], layer: int) -> None:
        if (layer + 1) % self._group and layer != self._num_layers - 1:
            return
        l0 = (layer // self._group) * self._group
        with self._lock:
            for chunk in prefills:
                entry = self._transfers.get(chunk.request.request_id)
                if entry is None:
                    continue
                transfer, first_start = entry
                s = chunk.request.num_computed_tokens
                if first_start is None:
                    entry[1] = first_start = s
                lo = 0 if s <= first_start else s // self._bs
                hi = -(-(s + chunk.num_new_tokens) // self._bs)
                table = self._block_table(chunk.request.request_id)
                transfer.push(table[lo:hi], lo, l0, layer + 1)
