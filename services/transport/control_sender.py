"""The sending end of the KV control plane (control_plane.py): ControlSender, one pooled connection
per receiver address with its writer and reader threads, and the transfer state machine.
"""
from __future__ import annotations

import json
import logging
import threading
import time

import torch


from .base import KVLayout, KVSender, KVTransportError, OutgoingTransfer, TransferStats
from .framing import FrameType, encode
from .watchdog import Watchdog
from .control_connection import SenderConnection
from .control_common import check_kv

log = logging.getLogger(__name__)


class ControlSender(KVSender):
    """Prefill (and migration source) side of every transport. Thread-safe.

    ``setting`` is this side's --kv-transport (auto | tcp | nccl | cuda_ipc); each connection
    runs the transport its handshake resolved. ``token``: the cluster token (services/auth.py);
    with one, a receiver that cannot prove it gets no KV (KVHandshakeError).
    """

    def __init__(self, layout: KVLayout, *, timeout_s: float = 30.0, setting: str = "tcp", token: str | None = None):
        self.layout = layout
        self.timeout_s = timeout_s
        self.setting = setting
        self.token = token
        self._watchdog: Watchdog | None = None       # started by the first device path that needs one
        self._lock = threading.Lock()
        self._conns: dict[str, SenderConnection] = {}
        self._connecting: dict[str, threading.Lock] = {}     # one connect at a time per address
        self._totals = {"bytes_sent": 0, "transfers": 0, "failures": 0, "aborts": 0, "window_s_total": 0.0}
        self._closed = False

    def open(self, request_id: str, address: str, kv: torch.Tensor) -> OutgoingTransfer:
        if self._closed:
            raise RuntimeError("open() on a closed KV sender")
        check_kv(kv, self.layout)
        transfer = Transfer(self, self._connection(address, kv), request_id, kv.shape[0])
        transfer.conn.register(transfer)
        transfer.conn.send(transfer, [encode(FrameType.OPEN, request_id)])
        return transfer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
            watchdog, self._watchdog = self._watchdog, None
        for conn in conns:
            conn.close("the sender was closed")
        if watchdog is not None:
            watchdog.close()

    def watchdog(self) -> Watchdog:
        """The sender's watchdog thread (started on first use)."""
        with self._lock:
            if self._watchdog is None:
                self._watchdog = Watchdog(name="kv-send-watchdog")
            return self._watchdog

    def stats(self) -> dict:
        with self._lock:
            return dict(self._totals, connections=len(self._conns))

    def _connection(self, address: str, kv: torch.Tensor) -> SenderConnection:
        """The live pooled connection to ``address``, connecting and handshaking if needed."""
        with self._lock:
            connecting = self._connecting.setdefault(address, threading.Lock())
        with connecting:
            with self._lock:
                conn = self._conns.get(address)
            if conn is None or conn.error is not None:
                conn = SenderConnection(address, self.layout, self.timeout_s, self, kv)
                with self._lock:
                    self._conns[address] = conn
            return conn

    def _dropped(self, conn: SenderConnection) -> None:
        """Called by a connection that failed: the next open() to its address reconnects."""
        with self._lock:
            if self._conns.get(conn.address) is conn:
                del self._conns[conn.address]

    def _count(self, **deltas) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._totals[key] += value


class Transfer(OutgoingTransfer):
    """One request's frames on a pooled connection."""

    def __init__(self, sender: ControlSender, conn: SenderConnection, request_id: str, num_blocks: int):
        self.request_id = request_id
        self.conn = conn
        self.aborted = False                 # read by the writer: drop this transfer's queued frames
        self.t_first: float | None = None    # set by the writer when it sends this transfer's first DATA frame
        self._sender = sender
        self._layout = sender.layout
        self._num_blocks = num_blocks
        self._state = "open"                 # open -> committing -> done
        self._done = threading.Event()
        self._error: KVTransportError | None = None
        self._t_ack = 0.0
        self._bytes = 0
        self._frames = 0

    def push(self, src_block_ids: list[int], first_index: int, layer_start: int, layer_end: int) -> None:
        if self._state != "open":
            raise RuntimeError(f"push() on transfer {self.request_id!r} after commit() or abort()")
        if self._error is not None:
            raise self._error
        num_blocks, num_layers = self._num_blocks, self._layout.num_layers
        if not 0 <= layer_start < layer_end <= num_layers:
            raise ValueError(f"layers [{layer_start}, {layer_end}) are not a range within [0, {num_layers})")
        if first_index < 0 or any(not 0 <= b < num_blocks for b in src_block_ids):
            raise ValueError(f"first_index {first_index} or a block id in {src_block_ids} is out of range "
                             f"(blocks 0..{num_blocks - 1})")
        if not src_block_ids:
            return
        nbytes = len(src_block_ids) * (layer_end - layer_start) * self._layout.bytes_per_block_layer
        staged = self.conn.path.stage(list(src_block_ids), layer_start, layer_end)
        fields = dict(first_index=first_index, num_blocks=len(src_block_ids), layer_start=layer_start,
                      layer_end=layer_end, payload_nbytes=nbytes)
        self._bytes += nbytes
        self._frames += 1
        self.conn.send(self, [], nbytes, data=(staged, fields))

    def commit(self, num_tokens: int, meta: dict, timeout: float) -> TransferStats:
        if self._state != "open":
            raise RuntimeError(f"commit() on transfer {self.request_id!r} after commit() or abort()")
        frame = encode(FrameType.COMMIT, self.request_id, json.dumps(meta), num_tokens=num_tokens)
        self._state = "committing"
        self.conn.send(self, [frame])
        if not self._done.wait(timeout) and self.conn.unregister(self):
            self._drop("commit timed out")
            self.finish(KVTransportError(f"no ACK for request {self.request_id!r} from {self.conn.address} within "
                                         f"the {timeout}s commit timeout; the transfer was aborted (is the "
                                         f"receiver overloaded or its on_commit stuck?)"))
        self._done.wait()      # already set, or about to be by the thread that unregistered us
        self._state = "done"
        if self._error is not None:
            self._sender._count(failures=1)
            raise self._error
        window = self._t_ack - (self.t_first or self._t_ack)
        self._sender._count(transfers=1, window_s_total=window)
        return TransferStats(self.request_id, self._bytes, window, self._frames)

    def abort(self, reason: str = "") -> None:
        if self._state == "done" or self.aborted or not self.conn.unregister(self):
            return
        self._drop(reason)
        self._sender._count(aborts=1)
        self.finish(KVTransportError(f"transfer of {self.request_id!r} was aborted: {reason or 'no reason given'}"))

    def finish(self, error: KVTransportError | None) -> None:
        """Resolve the transfer (ACK when ``error`` is None). Called once, by whoever unregistered it."""
        self._t_ack = time.perf_counter()
        self._error = error
        self._done.set()

    def _drop(self, reason: str) -> None:
        """Discard queued frames and tell the receiver to forget the request."""
        self.aborted = True
        self.conn.send(None, [encode(FrameType.ABORT, self.request_id, reason)])
