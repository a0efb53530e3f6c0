"""Payload paths: how the bytes of one DATA frame travel once a connection chose its transport.

Every transport shares one control plane: the framed socket of tcp.py (HELLO, DATA headers,
COMMIT, ACK/NACK, ABORT), so request bookkeeping, ordering, timeouts and teardown are written
once. What differs is the payload of a DATA frame, which a pair of paths carries:

- ``tcp``: inline on the socket after the header (zero-copy from a CPU cache; a CUDA cache is
  staged through host memory);
- ``nccl``: on a CUDA stream through an NCCL communicator owned by the connection (nccl_path.py);
- ``cuda_ipc``: not moved at all: the receiver maps the sender's cache and copies (cuda_ipc.py).

A send path runs ``stage`` on the pushing thread (cheap, never blocks on the network) and
``emit`` on the connection's writer thread, in frame order. A receive path runs ``receive`` on
the connection's reader thread, in frame order, and returns only when the frame's bytes are in
the cache (so ``KVReceiver.forget`` keeps its promise that nothing lands afterwards).
"""
from __future__ import annotations

import socket
from abc import ABC, abstractmethod

import torch

from .base import KVLayout
from .framing import Header, discard, recv_buffers
from .staging import as_bytes, gather_blocks, scatter_blocks, staging_shape


class SendPath(ABC):
    """Sender end of one connection's payload path."""

    inline = True         # emit() returns socket payload buffers (False: the payload goes elsewhere)

    def offer(self) -> str | None:
        """Text of the SETUP frame sent right after HELLO_OK, or None when the path needs none."""
        return None

    def join(self, timeout_s: float) -> None:
        """After SETUP is sent: finish the path's own set-up (e.g. join the NCCL communicator).
        Raises OSError (e.g. TimeoutError) on failure."""

    @abstractmethod
    def stage(self, src_block_ids: list[int], layer_start: int, layer_end: int) -> object:
        """On the pushing thread: capture what ``emit`` needs (views of the cache, or an event
        marking where the compute stream is). Never blocks on the network."""

    @abstractmethod
    def emit(self, staged: object) -> tuple[list, str]:
        """On the writer thread, in frame order: start moving the payload; return the buffers to
        write on the socket after the header and the frame's text. Raises OSError on failure."""

    def close(self) -> None:
        """Release the path's resources (communicator, streams). Idempotent."""


class ReceivePath(ABC):
    """Receiver end of one connection's payload path."""

    def accept(self, text: str) -> None:
        """Handle the sender's SETUP text. Raises OSError or ValueError to refuse it."""
        raise ValueError("this transport takes no SETUP frame")

    @abstractmethod
    def receive(self, sock: socket.socket, header: Header, text: str, dst_block_ids: list[int] | None,
                scratch: memoryview) -> None:
        """Consume one DATA frame whose header was read: write its blocks into the cache at
        ``dst_block_ids`` (the frame's share of the reservation), or drop them when None. Returns
        once the bytes are in the cache. Raises OSError when the connection or path fails."""

    def close(self) -> None:
        """Release the path's resources. Idempotent."""


def cache_bytes(kv: torch.Tensor, layout: KVLayout) -> memoryview:
    """A flat uint8 view of a contiguous CPU cache (shares its memory). Raises ValueError if
    ``kv`` does not match ``layout``."""
    if KVLayout.of(kv, layout.model_id) != layout:
        raise ValueError(f"kv {tuple(kv.shape)} {kv.dtype} does not match the transport's {layout}")
    if not kv.is_contiguous():
        raise ValueError("the KV transport needs a contiguous kv tensor")
    return memoryview(kv.view(-1).view(torch.uint8).numpy())   # bf16 has no numpy dtype: bytes


def block_slice(layout: KVLayout, block: int, layer_start: int, layer_end: int) -> slice:
    """Byte range of ``kv[block, layer_start:layer_end]`` in the flat cache."""
    start = (block * layout.num_layers + layer_start) * layout.bytes_per_block_layer
    return slice(start, start + (layer_end - layer_start) * layout.bytes_per_block_layer)


def compute_marker(kv: torch.Tensor) -> torch.cuda.Event:
    """An event recorded on the pushing thread's current stream of kv's GPU: it completes once
    everything queued so far (the layers just computed) has run."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(kv.device))
    return event


class TcpSendPath(SendPath):
    """Inline payload. CPU cache: memoryviews of the blocks, read when the writer sends them
    (zero-copy). CUDA cache: gathered on the GPU and copied to host on the writer thread."""

    def __init__(self, kv: torch.Tensor, layout: KVLayout):
        self.kv, self.layout = kv, layout
        self._cpu = kv.device.type == "cpu"
        self._cache = cache_bytes(kv, layout) if self._cpu else None

    def stage(self, src_block_ids, layer_start, layer_end):
        if self._cpu:
            return [self._cache[block_slice(self.layout, b, layer_start, layer_end)] for b in src_block_ids]
        return src_block_ids, layer_start, layer_end, compute_marker(self.kv)

    def emit(self, staged):
        if self._cpu:
            return staged, ""
        ids, l0, l1, marker = staged
        marker.synchronize()
        host = gather_blocks(self.kv, ids, l0, l1).cpu()     # [n, l1-l0, 2, bs, heads, dim]
        return [as_bytes(host).numpy()], ""


class TcpReceivePath(ReceivePath):
    """Inline payload: straight into a CPU cache's blocks (recv_into); through a host buffer
    and a scatter for a CUDA cache."""

    def __init__(self, kv: torch.Tensor, layout: KVLayout):
        self.kv, self.layout = kv, layout
        self._cpu = kv.device.type == "cpu"
        self._cache = cache_bytes(kv, layout) if self._cpu else None

    def receive(self, sock, header, text, dst_block_ids, scratch):
        if dst_block_ids is None:
            discard(sock, header.payload_nbytes, scratch)
            return
        l0, l1 = header.layer_start, header.layer_end
        if self._cpu:
            recv_buffers(sock, [self._cache[block_slice(self.layout, b, l0, l1)] for b in dst_block_ids])
            return
        host = torch.empty(staging_shape(self.kv, len(dst_block_ids), l0, l1), dtype=self.kv.dtype,
                           pin_memory=True)
        recv_buffers(sock, [memoryview(as_bytes(host).numpy())])
        scatter_blocks(self.kv, dst_block_ids, l0, l1, host)
        torch.cuda.current_stream(self.kv.device).synchronize()
