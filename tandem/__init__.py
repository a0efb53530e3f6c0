"""Tandem: a disaggregated prefill/decode LLM serving cluster.

The client SDK is importable from here (`from tandem import Client, AsyncClient`); it loads on
first use, so `import tandem` stays cheap (no grpc, no torch).
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

# grpcio >= 1.81 restarts its epoll poller in a forked child; when subprocess.Popen then closes the
# child's descriptors before exec, that poller hits EBADF and can abort the child (grpc/grpc#43055).
# Tandem forks only to exec (workers, router, redis-server), so gRPC's fork support stays off. It
# must be set before gRPC initialises: every launcher imports this package first.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"

_LAZY = {name: "tandem.client" for name in ("AsyncClient", "Chunk", "Client", "Completion")} | {
    name: "tandem.errors" for name in (
        "TandemError", "InvalidArgumentError", "UnavailableError", "ResourceExhaustedError",
        "DeadlineExceededError", "CancelledError", "NotFoundError", "InternalError")}
__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from tandem.client import AsyncClient, Chunk, Client, Completion
    from tandem.errors import (CancelledError, DeadlineExceededError, InternalError, InvalidArgumentError,
                               NotFoundError, ResourceExhaustedError, TandemError, UnavailableError)


def __getattr__(name: str):
    """Import the SDK name on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'tandem' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
