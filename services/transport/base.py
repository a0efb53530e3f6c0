"""KV transport interface: move a request's KV blocks from a prefill worker to a decode worker.

A worker's KV cache is one tensor ``kv: [num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]``, so ``kv[b, l0:l1]`` is contiguous for any block and layer range. The prefill side
(``KVSender``) pushes layer groups of a request's blocks as soon as they are computed; the decode
side (``KVReceiver``) has reserved its own physical blocks and writes each logical block ``i`` into
``dst_block_ids[i]``. Backends (``tcp`` now; ``nccl``/``cuda_ipc`` later) implement these classes.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch


class KVTransportError(RuntimeError):
    """A transfer failed: connection refused or lost, timeout, or refused (NACK) by the receiver."""


class KVHandshakeError(KVTransportError):
    """The two peers disagree on the KV layout (model, dtype, block size, shape); nothing was sent."""


_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# What to change when a field differs, appended to the mismatch message.
_FIX = {
    "model_id": "serve the same model (--model) on both",
    "dtype": "start both with the same --dtype",
    "block_size": "start both with the same --block-size",
    "num_layers": "serve the same model (--model) on both",
    "num_kv_heads": "serve the same model (--model) on both",
    "head_dim": "serve the same model (--model) on both",
    "layout": "run the same Tandem version on both",
}


@dataclass(frozen=True)
class KVLayout:
    """Everything two peers must agree on before KV bytes can move between their caches."""

    model_id: str
    dtype: str          # "float32" | "bfloat16" | "float16"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str = "blocks,layers,kv,block_size,kv_heads,head_dim"

    @classmethod
    def of(cls, kv: torch.Tensor, model_id: str) -> "KVLayout":
        """The layout of a cache tensor [blocks, layers, 2, block_size, kv_heads, head_dim].

        Raises ValueError for another rank, a K/V axis other than 2 or an unsupported dtype.
        """
        if kv.dim() != 6 or kv.shape[2] != 2:
            raise ValueError(f"kv must be [blocks, layers, 2, block_size, kv_heads, head_dim], "
                             f"got shape {tuple(kv.shape)}")
        if kv.dtype not in _DTYPES:
            raise ValueError(f"kv dtype {kv.dtype} is not one of {sorted(_DTYPES.values())}")
        _, layers, _, block_size, heads, head_dim = kv.shape
        return cls(model_id, _DTYPES[kv.dtype], block_size, layers, heads, head_dim)

    def mismatch(self, peer: "KVLayout", *, here: str = "here", there: str = "on the peer") -> str | None:
        """None when ``peer`` is compatible, else a message naming the first differing field,
        this side's value (labelled ``here``), the peer's (labelled ``there``) and what to change."""
        for field in dataclasses.fields(self):
            ours, theirs = getattr(self, field.name), getattr(peer, field.name)
            if ours != theirs:
                return f"{field.name} differs: {ours!r} {here}, {theirs!r} {there}; {_FIX[field.name]}"
        return None

    @property
    def bytes_per_block_layer(self) -> int:
        """Bytes of ``kv[b, l]``: one block of one layer, K and V."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * _ITEMSIZE[self.dtype]


@dataclass
class TransferStats:
    """What one committed transfer moved, measured over the bytes' actual window."""

    request_id: str
    bytes: int               # KV payload bytes (headers excluded)
    window_s: float          # first payload byte handed to the transport -> ACK received
    num_frames: int          # data frames (one per push)


class OutgoingTransfer(ABC):
    """One request's KV on its way to one receiver. Used by one thread at a time."""

    @abstractmethod
    def push(self, src_block_ids: list[int], first_index: int, layer_start: int, layer_end: int) -> None:
        """Queue ``kv[src_block_ids[i], layer_start:layer_end]`` for the receiver's logical block
        ``first_index + i``, same layers. Never blocks on the network.

        Zero-copy: the bytes are read when the frame is sent, not when it is pushed, so the caller
        keeps the blocks allocated until commit()/abort() returns and changes a pushed block only
        if it pushes it again afterwards (a partial block filled by the next chunk): frames are
        applied in order, the last write wins.
        Raises ValueError for ids or layers out of range, KVTransportError when the transfer has
        already failed (abort it), RuntimeError after commit() or abort().
        """

    @abstractmethod
    def commit(self, num_tokens: int, meta: dict, timeout: float) -> TransferStats:
        """Send everything queued, then COMMIT(num_tokens, meta); wait up to ``timeout`` seconds
        for the receiver's ACK. ``meta`` must be JSON-serialisable.

        Raises KVTransportError on NACK (with the receiver's reason), on connection loss and on
        timeout (the transfer is then aborted). Called at most once.
        """

    @abstractmethod
    def abort(self, reason: str = "") -> None:
        """Drop queued frames and tell the receiver to forget the request. Non-blocking; a safe
        no-op after commit() returned or raised, or a previous abort()."""


class KVSender(ABC):
    """Prefill side, one per worker, thread-safe. Pools one connection per destination address."""

    @abstractmethod
    def open(self, request_id: str, address: str, kv: torch.Tensor) -> OutgoingTransfer:
        """Start a transfer of blocks of ``kv`` (the sender's cache) to the receiver at ``address``.

        Connects and handshakes on first use of ``address`` (or after the connection was lost).
        Raises KVHandshakeError on a layout mismatch, KVTransportError when the receiver cannot
        be reached, ValueError when ``kv`` does not match this sender's layout or the request id
        is already in flight to that address.
        """

    @abstractmethod
    def close(self) -> None:
        """Fail pending transfers, close every connection and join their threads. Idempotent."""

    @abstractmethod
    def stats(self) -> dict:
        """Totals: bytes_sent, transfers (committed), failures, window_s_total."""


class KVReceiver(ABC):
    """Decode side: owns a listening data-plane socket and its threads."""

    address: str     # "host:port" actually bound

    @abstractmethod
    def expect(self, request_id: str, dst_block_ids: list[int],
               on_commit: Callable[[str, int, dict], str | None]) -> None:
        """Accept ``request_id``: its logical block ``i`` lands in physical ``dst_block_ids[i]``.

        Frames of requests not expected (or forgotten) are read and discarded, except those of a
        transfer the sender opened just before: the receiver holds them until this call, for a
        bounded time (see ControlReceiver), so a reservation may race the sender's first push. ``on_commit(request_id, num_tokens, meta)`` runs on a receiver thread once every
        byte of the request is in ``kv``; it returns None to ACK or a reason string to NACK. After
        a commit (ACK or NACK) the request is forgotten. Raises ValueError for a block id out of
        range or a request id already expected.
        """

    @abstractmethod
    def forget(self, request_id: str) -> None:
        """After this returns no byte of ``request_id`` is written into ``kv`` any more (a frame
        being written is waited for, bounded by the receive timeout). Later frames are discarded
        and a later commit is refused with "unknown request". A safe no-op for unknown ids."""

    @abstractmethod
    def stats(self) -> dict:
        """Totals: bytes_received, transfers_committed, transfers_refused."""

    @abstractmethod
    def close(self) -> None:
        """Stop listening, close connections and join threads. Idempotent."""
