"""One NCCL communicator through CuPy (``cupy.cuda.nccl``), with its own CUDA stream.

Needs a GPU and ``pip install .[gpu]`` (cupy-cuda12x, nvidia-nccl-cu12). Nothing here is imported
by the rest of the project unless a cache lives on a GPU and the pair chose ``nccl``.

Blocks move as staging buffers (staging.py): the sender gathers ``kv[ids, l0:l1]`` on the link's
stream, after the compute stream's marker, and sends the buffer as bytes; the receiver receives
into a buffer of the same shape and scatters it into its own block ids. Sends and receives are
matched in the order each side issues them, so both sides must issue one operation per frame, in
frame order (the control plane's frame order). NCCL has no timeout of its own: callers pass
the returned events to the watchdog, which calls ``abort``.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from .staging import as_bytes, gather_blocks, scatter_blocks, staging_shape
from .watchdog import wait


def _nccl():
    """CuPy's NCCL module. Raises RuntimeError saying how to install it when it is missing."""
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise RuntimeError("the nccl KV transport needs CuPy: pip install .[gpu]") from e
    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy cannot load libnccl: pip install nvidia-nccl-cu12 (part of .[gpu])")
    return nccl


def _run_with_timeout(fn, timeout_s: float, what: str):
    """fn() on a helper thread; TimeoutError if it has not returned within ``timeout_s`` (the
    thread is left behind: NCCL's blocking init cannot be interrupted before it returns a handle)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:       # handed to the caller
            box["error"] = e
    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:g}s (is the peer up?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


class NcclLink:
    """A communicator of ``nranks`` ranks (this process is ``rank``) on ``device``.

    Operations are enqueued on ``self.stream`` and return at once; ``send_blocks``/``recv_blocks``
    return an event that completes with the operation (None inside ``group()``). Not thread-safe
    except ``abort``, which any thread (the watchdog) may call to end a hung operation.
    """

    @staticmethod
    def new_unique_id() -> bytes:
        """A fresh NCCL unique id (128 bytes) for rank 0 to hand to its peers."""
        return bytes(_nccl().get_unique_id())          # CuPy >= 14 returns bytes

    def __init__(self, unique_id: bytes, nranks: int, rank: int, device: torch.device | str,
                 init_timeout_s: float = 60.0):
        """Join the communicator; blocks until every rank joined. Raises TimeoutError after
        ``init_timeout_s``, ValueError for a malformed id, RuntimeError without CuPy/NCCL."""
        nccl = _nccl()
        if len(unique_id) != 128:
            raise ValueError(f"an NCCL unique id has 128 bytes, got {len(unique_id)}")
        import cupy
        self.device = torch.device(device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.Stream(self.device)
        self._uint8 = nccl.NCCL_UINT8

        def init():
            with cupy.cuda.Device(index):
                return nccl.NcclCommunicator(nranks, bytes(unique_id), rank)
        self._comm = _run_with_timeout(init, init_timeout_s, f"NCCL init (rank {rank} of {nranks})")
        self._deferred: list | None = None        # scatters to run after the current group
        self._lock = threading.Lock()
        self._state = "open"                      # open | aborted | closed

    @contextmanager
    def group(self):
        """Operations inside are fused (ncclGroupStart/End): e.g. a self send/recv on one GPU.
        Receives' scatters run after the group, when the data has arrived."""
        nccl = _nccl()
        self._deferred = []
        nccl.groupStart()
        try:
            yield self
        finally:
            nccl.groupEnd()
            deferred, self._deferred = self._deferred, None
            with torch.cuda.stream(self.stream):
                for kv, ids, l0, l1, staging in deferred:
                    scatter_blocks(kv, ids, l0, l1, staging)

    def send_blocks(self, kv: torch.Tensor, ids: list[int], layer_start: int, layer_end: int, peer: int,
                    after: torch.cuda.Event | None = None) -> torch.cuda.Event | None:
        """Send ``kv[ids, layer_start:layer_end]`` to ``peer`` once ``after`` (the compute stream's
        marker) has completed. The peer must ``recv_blocks`` the same number of blocks and layers."""
        self._check_open()
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            staging = gather_blocks(kv, ids, layer_start, layer_end)   # [n, l1-l0, 2, bs, heads, dim]
            buf = as_bytes(staging)
            self._comm.send(buf.data_ptr(), buf.numel(), self._uint8, peer, self.stream.cuda_stream)
        return self._marker()

    def recv_blocks(self, kv: torch.Tensor, ids: list[int] | None, layer_start: int, layer_end: int, peer: int,
                    num_blocks: int | None = None) -> torch.cuda.Event | None:
        """Receive ``num_blocks`` (default ``len(ids)``) blocks of layers [layer_start, layer_end)
        from ``peer`` and write them into ``kv[ids, ...]``; ``ids=None`` receives and drops them
        (the sender's operation must still be matched)."""
        self._check_open()
        n = len(ids) if ids is not None else num_blocks
        if n is None or (ids is not None and num_blocks is not None and num_blocks != len(ids)):
            raise ValueError("recv_blocks needs ids, or num_blocks equal to len(ids)")
        with torch.cuda.stream(self.stream):
            staging = torch.empty(staging_shape(kv, n, layer_start, layer_end), dtype=kv.dtype, device=kv.device)
            buf = as_bytes(staging)
            self._comm.recv(buf.data_ptr(), buf.numel(), self._uint8, peer, self.stream.cuda_stream)
            if ids is not None:
                if self._deferred is not None:
                    self._deferred.append((kv, ids, layer_start, layer_end, staging))
                else:
                    scatter_blocks(kv, ids, layer_start, layer_end, staging)
        return self._marker()

    def synchronize(self, timeout_s: float) -> None:
        """Wait for everything enqueued so far; past ``timeout_s`` abort the communicator and raise
        WatchdogExpired (a TimeoutError)."""
        event = torch.cuda.Event()
        event.record(self.stream)
        wait(event, timeout_s, self.abort, "an NCCL transfer")

    def abort(self) -> None:
        """End every pending operation (they fail) and make the link unusable. Any thread; idempotent."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "aborted"
        self._comm.abort()

    def close(self) -> None:
        """Destroy the communicator (abort it when operations may be pending). Idempotent."""
        with self._lock:
            if self._state == "closed":
                return
            was_open, self._state = self._state == "open", "closed"
        if was_open:
            self._comm.destroy()

    def _check_open(self) -> None:
        if self._state != "open":
            raise ConnectionError(f"the NCCL link is {self._state}")

    def _marker(self) -> torch.cuda.Event | None:
        if self._deferred is not None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event
