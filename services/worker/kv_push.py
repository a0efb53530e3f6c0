"""Prefill side: push each layer group of each prefill chunk to its decode instance as soon as
the model has written it, so the transfer overlaps the rest of the prefill.

Runs on the engine thread as LLMEngine.on_prefill_layer. A chunk covers positions
[s, e) = [num_computed_tokens, + num_new_tokens); after layer l finishes a group [l0, l] the
request's logical blocks [s // block_size, ceil(e / block_size)) are pushed for those layers.
The first chunk seen also pushes the blocks before s (a prefix-cache hit the chunk did not
compute). A block split across two chunks is pushed twice; frames apply in order, so the
receiver ends with the complete block.

The prefill starts before its transfer is open (opening may connect, and runs off the engine
thread): a request registered without a transfer has its pushes held, in order, until `attach`
hands them to the transfer, or drops them when it could not open.

A push that fails (the transfer broke: KVTransportError; or the push was refused: ValueError) must
not escape: this runs inside the engine step, where an exception would stop the engine and fail
every request on the instance. The failure is remembered for that request, which gets no further
push; `failure(request_id)` (or `unregister`) tells the servicer, which falls back to recompute.
"""
from __future__ import annotations

import logging
import threading

from services.engine.blocks import cdiv
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
        # request_id → [transfer (None until attached), first chunk start or None, pushes held until attached]
        self._transfers: dict[str, list] = {}
        self._failures: dict[str, str] = {}       # request_id → why its push failed (registered ones only)

    def register(self, request_id: str, transfer=None) -> None:
        """Push the request's KV to `transfer` from its next prefill layer on; with None, hold the
        pushes until attach(). Call before the request reaches the engine."""
        with self._lock:
            self._transfers[request_id] = [transfer, None, []]
            self._failures.pop(request_id, None)

    def attach(self, request_id: str, transfer=None, error: str | None = None) -> None:
        """The transfer of a request registered without one is open: push what was held, in order,
        then push to it directly. With `error` (it could not open) the held pushes are dropped and
        `error` becomes the request's failure(). A no-op once unregistered. Any thread."""
        with self._lock:
            entry = self._transfers.get(request_id)
            if entry is None:
                return
            if error is not None:
                self._fail(request_id, error)
                return
            entry[0], held, entry[2] = transfer, entry[2], []
            for args in held:
                if not self._push(request_id, transfer, *args):
                    return

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
                transfer, first_start, held = entry
                s = chunk.request.num_computed_tokens
                if first_start is None:
                    entry[1] = first_start = s
                lo = 0 if s <= first_start else s // self._bs
                hi = cdiv(s + chunk.num_new_tokens, self._bs)
                rid = chunk.request.request_id
                args = (self._block_table(rid)[lo:hi], lo, l0, layer + 1)
                if transfer is None:
                    held.append(args)
                else:
                    self._push(rid, transfer, *args)

    def push_whole(self, requests: list) -> None:
        """Push every layer of each registered request's prompt blocks at once: the followers of a
        step's prompt (LLMEngine.on_forked), whose KV was copied after the step, not computed in it."""
        with self._lock:
            for r in requests:
                entry = self._transfers.get(r.request_id)
                if entry is None:
                    continue
                transfer = entry[0]
                entry[1] = 0
                args = (self._block_table(r.request_id)[:cdiv(r.num_prompt_tokens, self._bs)], 0, 0, self._num_layers)
                if transfer is None:
                    entry[2].append(args)
                else:
                    self._push(r.request_id, transfer, *args)

    # ---- under the lock ------------------------------------------------------------------------
    def _push(self, rid: str, transfer, blocks: list[int], first_index: int, l0: int, l1: int) -> bool:
        """One push; a failure stops this request's pushes only (the engine step goes on)."""
        try:
            transfer.push(blocks, first_index, l0, l1)
            return True
        except (KVTransportError, ValueError) as e:
            self._fail(rid, str(e))
            return False

    def _fail(self, rid: str, error: str) -> None:
        self._failures[rid] = error
        del self._transfers[rid]
        log.warning("request %s: %s; it stops pushing and will fall back to recompute", rid, error)
