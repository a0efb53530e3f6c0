"""KV transport: moves a request's KV blocks between workers (prefill→decode, decode→decode).

``make_sender``/``make_receiver`` take this side's ``--kv-transport`` setting: ``auto``, ``tcp``,
``nccl`` or ``cuda_ipc``. Every connection shares one control plane (control_plane.py) and runs
the transport both sides agree on (selection.py: ``auto`` picks cuda_ipc on one GPU, nccl
between GPUs, tcp otherwise; two different explicit settings are refused at the handshake).
Importing this package, and any CPU cache, never touches CUDA or imports CuPy.
"""
from __future__ import annotations

import torch

from .base import (KVHandshakeError, KVLayout, KVReceiver, KVSender, KVTransportError, OutgoingTransfer,
                   TransferStats)
from .control_plane import ControlReceiver, ControlSender
from .selection import SETTINGS, TRANSPORTS, check_setting

__all__ = ["KVHandshakeError", "KVLayout", "KVReceiver", "KVSender", "KVTransportError", "OutgoingTransfer",
           "SETTINGS", "TransferStats", "TRANSPORTS", "make_receiver", "make_sender"]


def make_sender(setting: str, layout: KVLayout, *, timeout_s: float = 30.0, token: str | None = None) -> KVSender:
    """The sending side for this worker's ``--kv-transport`` ``setting``; ``token``: the cluster
    token its receivers must prove (services/auth.py). Raises ValueError for an unknown setting."""
    check_setting(setting)
    return ControlSender(layout, timeout_s=timeout_s, setting=setting, token=token)


def make_receiver(setting: str, layout: KVLayout, kv: torch.Tensor, host: str = "127.0.0.1", port: int = 0,
                  *, timeout_s: float = 30.0, token: str | None = None) -> KVReceiver:
    """The receiving side for ``setting``, listening on ``host:port`` (0: any free port) and
    writing into ``kv``. Raises ValueError for an unknown setting or a ``kv`` that does not match
    ``layout``; OSError if the address cannot be bound. ``token``: the cluster token senders must
    prove (None: any sender)."""
    check_setting(setting)
    return ControlReceiver(layout, kv, host, port, timeout_s=timeout_s, setting=setting, token=token)
