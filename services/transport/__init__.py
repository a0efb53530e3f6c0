"""KV transport: moves a request's KV blocks from a prefill worker to a decode worker.

``make_sender``/``make_receiver`` build a backend by name; only ``tcp`` exists so far (``nccl`` and
``cuda_ipc`` come later). Importing this package needs nothing GPU.
"""
from __future__ import annotations

import torch

from .base import (KVHandshakeError, KVLayout, KVReceiver, KVSender, KVTransportError, OutgoingTransfer,
                   TransferStats)
from .tcp import TcpReceiver, TcpSender

TRANSPORTS = ("tcp",)

__all__ = ["KVHandshakeError", "KVLayout", "KVReceiver", "KVSender", "KVTransportError", "OutgoingTransfer",
           "TransferStats", "TRANSPORTS", "make_receiver", "make_sender"]


def _check(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {transport!r}; known: {', '.join(TRANSPORTS)}")


def make_sender(transport: str, layout: KVLayout, *, timeout_s: float = 30.0) -> KVSender:
    """The prefill-side sender of ``transport``. Raises ValueError for an unknown name."""
    _check(transport)
    return TcpSender(layout, timeout_s=timeout_s)


def make_receiver(transport: str, layout: KVLayout, kv: torch.Tensor, host: str = "127.0.0.1", port: int = 0,
                  *, timeout_s: float = 30.0) -> KVReceiver:
    """The decode-side receiver of ``transport``, listening on ``host:port`` (0: any free port) and
    writing into ``kv``. Raises ValueError for an unknown name or a ``kv`` that does not match
    ``layout``; OSError if the address cannot be bound."""
    _check(transport)
    return TcpReceiver(layout, kv, host, port, timeout_s=timeout_s)
