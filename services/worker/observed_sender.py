"""A KVSender wrapper that records each committed transfer's window in the worker's metrics.

The transport measures the window itself (first byte on the wire → the receiver's ACK, see
TransferStats); this layer only forwards the calls and observes the result, so every backend is
measured the same way and the transports stay free of Prometheus.
"""
from __future__ import annotations

from services.transport import KVSender, OutgoingTransfer, TransferStats
from services.worker import metrics


class ObservedSender(KVSender):
    """Same contract as the wrapped sender; `open` returns transfers whose commit is observed."""

    def __init__(self, inner: KVSender, instance_id: str):
        self.inner, self.instance_id = inner, instance_id

    def open(self, request_id: str, address: str, kv) -> OutgoingTransfer:
        return _ObservedTransfer(self.inner.open(request_id, address, kv), self.instance_id)

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict:
        return self.inner.stats()

    def __getattr__(self, name):            # backend-specific extras stay reachable
        return getattr(self.inner, name)


class _ObservedTransfer(OutgoingTransfer):
    def __init__(self, inner: OutgoingTransfer, instance_id: str):
        self.inner, self.instance_id = inner, instance_id

    def push(self, src_block_ids: list[int], first_index: int, layer_start: int, layer_end: int) -> None:
        self.inner.push(src_block_ids, first_index, layer_start, layer_end)

    def commit(self, num_tokens: int, meta: dict, timeout: float) -> TransferStats:
        stats = self.inner.commit(num_tokens, meta, timeout)      # raises on failure: nothing observed
        metrics.kv_transfer_committed(self.instance_id, stats.window_s)
        return stats

    def abort(self, reason: str = "") -> None:
        self.inner.abort(reason)

    def __getattr__(self, name):
        return getattr(self.inner, name)
