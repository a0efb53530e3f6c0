"""What the KV control plane's two ends share: the commit callback's type, the kv tensor check,
the payload path each transport uses (paths.py, nccl_path.py, cuda_ipc.py), socket shutdown.
"""
from __future__ import annotations

import logging
import socket
from typing import Callable

import torch

from .base import KVLayout
from .paths import ReceivePath, SendPath, TcpReceivePath, TcpSendPath
from .watchdog import Watchdog

log = logging.getLogger(__name__)


OnCommit = Callable[[str, int, dict], "str | None"]


def check_kv(kv: torch.Tensor, layout: KVLayout) -> None:
    """Raises ValueError if ``kv`` does not match ``layout`` or is not contiguous."""
    if KVLayout.of(kv, layout.model_id) != layout:
        raise ValueError(f"kv {tuple(kv.shape)} {kv.dtype} does not match the transport's {layout}")
    if not kv.is_contiguous():
        raise ValueError("the KV transport needs a contiguous kv tensor")


def send_path(transport: str, kv: torch.Tensor, layout: KVLayout, timeout_s: float, watchdog: Watchdog,
               on_broken) -> SendPath:
    if transport == "tcp":
        return TcpSendPath(kv, layout)
    if transport == "nccl":
        from .nccl_path import NcclSendPath          # imports CuPy: only for a pair that chose nccl
        return NcclSendPath(kv, layout, timeout_s, watchdog, on_broken)
    from .cuda_ipc import IpcSendPath
    return IpcSendPath(kv, layout)


def receive_path(transport: str, kv: torch.Tensor, layout: KVLayout, timeout_s: float) -> ReceivePath:
    if transport == "tcp":
        return TcpReceivePath(kv, layout)
    if transport == "nccl":
        from .nccl_path import NcclReceivePath
        return NcclReceivePath(kv, layout, timeout_s)
    from .cuda_ipc import IpcReceivePath
    return IpcReceivePath(kv, layout)


def shutdown_socket(sock: socket.socket) -> None:
    """Shut a socket down both ways, waking any thread blocked on it; ignore an already-closed one."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
