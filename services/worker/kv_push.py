"""Prefill side: push each layer group of each prefill chunk to its decode instance as soon as
the model has written it, so the transfer overlaps the rest of the prefill.

Runs on the engine thread as LLMEngine.on_prefill_layer. A chunk covers positions
[s, e) = [num_computed_tokens, + num_new_tokens); after layer l finishes a group [l0, l] the
request's logical blocks [s // block_size, ceil(e / block_size)) are pushed for those layers.
The first chunk seen also pushes the blocks before s (a prefix-cache hit the chunk did not
compute). A block split across two chunks is pushed twice; frames apply in order, so the
receiver ends with the complete block.

A push that fails (the transfer broke: KVTransportError; or the push was refused: ValueError) must
not escape: this runs inside the engine step, where an exception would stop the engine and fail
every request on the instance. The failure is remembered for that request, which gets no further
push; `failure(request_id)` (or `unregister`) tells the servicer, which falls back to recompute.
"""
from __future__ import annotations

import logging
import threading

from services.engine.scheduler import ScheduledChunk
from services.transport import KVTransportError

log = logging.getLogger("tandem.worker")


class PrefillPusher:
    def __init__(self, block_table, block_size: int, num_layers: int, layer_group: int):
        """block_table: request_id → its physical block ids (KVCacheManager.block_table)."""
        if layer_group <= 0:
            raise ValueError(f"layer_group must be positive, got {layer_group}")
        self._block_table, self._bs = block_table, block_size
        self._num_layers, self._group = num_layers, min(layer_group, num_layers)
        self._lock = threading.Lock()
        self._transfers: dict[str, list] = {}     # request_id → [transfer, first chunk start or None]
        self._failures: dict[str, str] = {}       # request_id → why its push failed (registered ones only)

    def register(self, request_id: str, transfer) -> None:
        with self._lock:
            self._transfers[request_id] = [transfer, None]
            self._failures.pop(request_id, None)

    def unregister(self, request_id: str) -> str | None:
        """After this returns no further push for the request starts. Returns why a push of it
        failed (see failure()), or None, and forgets both."""
        with self._lock:
            self._transfers.pop(request_id, None)
            return self._failures.pop(request_id, None)

    def failure(self, request_id: str) -> str | None:
        """Why a push of the request failed (it gets no further push; its transfer cannot commit),
        or None while its pushes succeed. Any thread."""
        with self._lock:
            return self._failures.get(request_id)

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
                rid = chunk.request.request_id
                try:
                    transfer.push(self._block_table(rid)[lo:hi], lo, l0, layer + 1)
                except (KVTransportError, ValueError) as e:    # this request only: the engine step goes on
                    self._failures[rid] = str(e)
                    del self._transfers[rid]
                    log.warning("request %s: %s; it stops pushing and will fall back to recompute", rid, e)
