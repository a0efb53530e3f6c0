"""The KV control plane: framed sockets shared by every transport (wire format in framing.py).

Sender: one pooled connection per receiver address, i.e. per pair of instances. Its HELLO states
the layout and this side's endpoint; the receiver picks the transport (selection.py) and the
connection gets the matching payload path (paths.py: ``tcp`` inline and zero-copy, ``nccl``,
``cuda_ipc``), set up once through a SETUP frame. ``push`` only stages (memoryviews of the cache,
or a compute-stream marker); the connection's writer thread emits each frame's payload and
header in push order, and its reader thread matches ACK/NACK frames to committing transfers by
request id. Receiver: a thread per accepted connection reads frames in order and hands each
DATA frame to the connection's receive path, which writes ``kv[dst_block_ids[i], l0:l1]``;
``on_commit`` callbacks run on a small pool so a slow callback does not stall the connection.
A transfer may open before the receiver expects it (the decode instance reserves while the
prefill instance already computes): its OPEN frame announces it, and the connection holds its
first DATA or COMMIT frame until ``expect`` lands, up to ``open_wait_s`` after the OPEN; then the
transfer is refused (NACK), so the sender falls back at once instead of committing partial KV.
Any failure (socket, path, watchdog) fails the connection and every transfer on it; the next
``open`` to that address reconnects with a fresh path.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import queue
import secrets
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from services.auth import CLUSTER_TOKEN_FIX, kv_proof, kv_proof_ok

from .base import (KVHandshakeError, KVLayout, KVReceiver, KVSender, KVTransportError, OutgoingTransfer,
                   TransferStats)
from .framing import (FrameType, Header, ProtocolError, encode, hello_problem, hello_text, parse_hello,
                      recv_frame, send_buffers, tune, wait_readable)
from .paths import ReceivePath, SendPath, TcpReceivePath, TcpSendPath
from .selection import Endpoint, TransportMismatch, local_endpoint, resolve
from .watchdog import Watchdog

log = logging.getLogger(__name__)

OnCommit = Callable[[str, int, dict], "str | None"]


def _check_kv(kv: torch.Tensor, layout: KVLayout) -> None:
    """Raises ValueError if ``kv`` does not match ``layout`` or is not contiguous."""
    if KVLayout.of(kv, layout.model_id) != layout:
        raise ValueError(f"kv {tuple(kv.shape)} {kv.dtype} does not match the transport's {layout}")
    if not kv.is_contiguous():
        raise ValueError("the KV transport needs a contiguous kv tensor")


def _send_path(transport: str, kv: torch.Tensor, layout: KVLayout, timeout_s: float, watchdog: Watchdog,
               on_broken) -> SendPath:
    if transport == "tcp":
        return TcpSendPath(kv, layout)
    if transport == "nccl":
        from .nccl_path import NcclSendPath          # imports CuPy: only for a pair that chose nccl
        return NcclSendPath(kv, layout, timeout_s, watchdog, on_broken)
    from .cuda_ipc import IpcSendPath
    return IpcSendPath(kv, layout)


def _receive_path(transport: str, kv: torch.Tensor, layout: KVLayout, timeout_s: float) -> ReceivePath:
    if transport == "tcp":
        return TcpReceivePath(kv, layout)
    if transport == "nccl":
        from .nccl_path import NcclReceivePath
        return NcclReceivePath(kv, layout, timeout_s)
    from .cuda_ipc import IpcReceivePath
    return IpcReceivePath(kv, layout)


# ---------------------------------------------------------------------------------------- sender

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
        self._conns: dict[str, _Connection] = {}
        self._connecting: dict[str, threading.Lock] = {}     # one connect at a time per address
        self._totals = {"bytes_sent": 0, "transfers": 0, "failures": 0, "aborts": 0, "window_s_total": 0.0}
        self._closed = False

    def open(self, request_id: str, address: str, kv: torch.Tensor) -> OutgoingTransfer:
        if self._closed:
            raise RuntimeError("open() on a closed KV sender")
        _check_kv(kv, self.layout)
        transfer = _Transfer(self, self._connection(address, kv), request_id, kv.shape[0])
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

    def _connection(self, address: str, kv: torch.Tensor) -> "_Connection":
        """The live pooled connection to ``address``, connecting and handshaking if needed."""
        with self._lock:
            connecting = self._connecting.setdefault(address, threading.Lock())
        with connecting:
            with self._lock:
                conn = self._conns.get(address)
            if conn is None or conn.error is not None:
                conn = _Connection(address, self.layout, self.timeout_s, self, kv)
                with self._lock:
                    self._conns[address] = conn
            return conn

    def _dropped(self, conn: "_Connection") -> None:
        """Called by a connection that failed: the next open() to its address reconnects."""
        with self._lock:
            if self._conns.get(conn.address) is conn:
                del self._conns[conn.address]

    def _count(self, **deltas) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._totals[key] += value


class _Connection:
    """One connection to a receiver: a writer thread drains the frame queue, a reader thread
    resolves committing transfers on ACK/NACK. Any socket or path error fails every pending
    transfer. ``path`` carries DATA payloads by the transport the handshake chose."""

    def __init__(self, address: str, layout: KVLayout, timeout_s: float, sender: ControlSender, kv: torch.Tensor):
        self.address = address
        self.error: KVTransportError | None = None       # set once, when the connection fails
        self._sender = sender
        self._lock = threading.Lock()
        self._pending: dict[str, _Transfer] = {}
        # items: (transfer | None, buffers, nbytes, data) | None; data = (staged, header fields) of a DATA frame
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.transport = ""
        self.path: SendPath | None = None
        self.sock = self._connect(layout, timeout_s, kv)
        self._writer = threading.Thread(target=self._write_loop, name=f"kv-send {address}", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"kv-ack {address}", daemon=True)
        self._writer.start()
        self._reader.start()

    def _connect(self, layout: KVLayout, timeout_s: float, kv: torch.Tensor) -> socket.socket:
        """Connect and handshake (both ends check the other's HELLO; the receiver names the
        transport, which this side re-derives), then set the payload path up."""
        host, _, port = self.address.rpartition(":")
        ours = local_endpoint(self._sender.setting, kv)
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        except (OSError, ValueError) as e:
            raise KVTransportError(f"cannot connect to the KV receiver at {self.address}: {e}; check that "
                                   f"the decode worker is up and this is its data-plane address") from e
        there = f"on the receiver ({self.address})"
        try:
            tune(sock, timeout_s)
            nonce = secrets.token_hex(16)
            send_buffers(sock, [encode(FrameType.HELLO, text=hello_text(layout, ours.to_dict(), nonce=nonce))])
            header, _, text = recv_frame(sock)
            if header.ftype == FrameType.HELLO_OK:
                hello = parse_hello(text)
                problem = hello_problem(layout, hello, "on the sender", there)
                if problem is None:
                    problem = self._agree(ours, hello)
                if problem is None:
                    problem = self._authenticate(sock, hello, nonce)
            elif header.ftype == FrameType.HELLO_ERR:
                problem = text
            else:
                raise ProtocolError(f"expected HELLO_OK or HELLO_ERR, got {header.ftype.name}")
            if problem is None:
                self._set_up_path(sock, kv, layout, timeout_s)
        except KVHandshakeError:
            sock.close()
            raise
        except Exception as e:         # socket errors, a malformed reply, a path that failed to set up
            sock.close()
            if self.path is not None:
                self.path.close()
            raise KVTransportError(f"KV handshake with {self.address} failed: {e}") from e
        if problem:
            sock.close()
            raise KVHandshakeError(f"KV handshake with the receiver at {self.address} refused: {problem}")
        return sock

    def _authenticate(self, sock: socket.socket, hello: dict, nonce: str) -> str | None:
        """Check the receiver's proof of the cluster token (on our nonce), send ours (on its nonce),
        read its verdict. None when both sides accepted; else why not."""
        token = self._sender.token
        if token and not kv_proof_ok(token, nonce, "receiver", hello.get("proof")):
            return f"the receiver did not prove the cluster token, so no KV goes to it: {CLUSTER_TOKEN_FIX}"
        proof = kv_proof(token, str(hello.get("nonce", "")), "sender") if token else ""
        send_buffers(sock, [encode(FrameType.AUTH, text=json.dumps({"proof": proof}))])
        header, _, text = recv_frame(sock)
        if header.ftype == FrameType.AUTH_ERR:
            return text
        if header.ftype != FrameType.AUTH_OK:
            raise ProtocolError(f"expected AUTH_OK or AUTH_ERR, got {header.ftype.name}")
        return None

    def _agree(self, ours: Endpoint, hello: dict) -> str | None:
        """Check the receiver's transport choice against ours; None when they agree."""
        try:
            theirs = Endpoint.from_dict(hello["endpoint"])
            self.transport = resolve(ours, theirs)
        except TransportMismatch as e:
            return str(e)
        except (KeyError, ValueError) as e:
            raise ProtocolError(f"malformed HELLO_OK: {e}") from e
        if hello.get("transport") != self.transport:
            return (f"the receiver chose transport {hello.get('transport')!r}, this side {self.transport!r}; "
                    f"run the same Tandem version on both")
        return None

    def _set_up_path(self, sock: socket.socket, kv: torch.Tensor, layout: KVLayout, timeout_s: float) -> None:
        """Build the send path and, when it needs one, run its SETUP exchange."""
        watchdog = self._sender.watchdog() if self.transport == "nccl" else None
        self.path = _send_path(self.transport, kv, layout, timeout_s, watchdog,
                               on_broken=lambda reason: self._fail(reason))
        offer = self.path.offer()
        if offer is None:
            return
        send_buffers(sock, [encode(FrameType.SETUP, text=offer)])
        self.path.join(timeout_s)
        header, _, text = recv_frame(sock)
        if header.ftype == FrameType.SETUP_ERR:
            raise ConnectionError(f"the receiver could not set up {self.transport}: {text}")
        if header.ftype != FrameType.SETUP_OK:
            raise ProtocolError(f"expected SETUP_OK or SETUP_ERR, got {header.ftype.name}")

    def register(self, transfer: "_Transfer") -> None:
        """Track a new transfer. Raises KVTransportError if the connection has just failed,
        ValueError if the request id is already in flight here."""
        with self._lock:
            if self.error is not None:
                raise self.error
            if transfer.request_id in self._pending:
                raise ValueError(f"request {transfer.request_id!r} already has a transfer to {self.address}")
            self._pending[transfer.request_id] = transfer

    def unregister(self, transfer: "_Transfer") -> bool:
        """Stop tracking ``transfer``; True if this call removed it (the caller then finishes it)."""
        with self._lock:
            if self._pending.get(transfer.request_id) is not transfer:
                return False
            del self._pending[transfer.request_id]
            return True

    def send(self, transfer: "_Transfer | None", buffers: list, nbytes: int = 0, data: tuple | None = None) -> None:
        """Queue one frame: prebuilt ``buffers``, or for a DATA frame ``data`` = (staged, header
        fields), emitted by the path on the writer thread. Frames of an aborted ``transfer`` are
        dropped unsent; ``transfer=None`` frames are always sent."""
        self._queue.put((transfer, buffers, nbytes, data))

    def close(self, reason: str) -> None:
        """Fail pending transfers, close the socket and join both threads."""
        self._fail(reason)
        self._reader.join()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            transfer, buffers, nbytes, data = item
            if transfer is not None:
                if transfer.aborted:
                    continue
                if transfer.t_first is None and data is not None:
                    transfer.t_first = time.perf_counter()
            try:
                if data is not None:
                    staged, fields = data
                    payload, text = self.path.emit(staged)
                    buffers = [encode(FrameType.DATA, transfer.request_id, text, **fields), *payload]
                send_buffers(self.sock, buffers)
            except Exception as e:        # socket errors; a device path's CUDA/NCCL error
                self._fail(f"send failed: {e}")
                return
            if nbytes:
                self._sender._count(bytes_sent=nbytes)

    def _read_loop(self) -> None:
        try:
            while True:
                wait_readable(self.sock)
                header, rid, text = recv_frame(self.sock)
                if header.ftype not in (FrameType.ACK, FrameType.NACK) or header.payload_nbytes:
                    raise ProtocolError(f"unexpected {header.ftype.name} frame from the receiver")
                with self._lock:
                    transfer = self._pending.pop(rid, None)
                if transfer is not None:        # else: a late reply to a timed-out or aborted transfer
                    refused = (KVTransportError(f"the KV receiver at {self.address} refused request {rid!r}: "
                                                f"{text}") if header.ftype == FrameType.NACK else None)
                    transfer.finish(refused)
        except (OSError, ValueError) as e:       # ConnectionError, TimeoutError, ProtocolError, bad UTF-8
            self._fail(str(e) or type(e).__name__)
        finally:
            self._writer.join()
            self.sock.close()
            if self.path is not None:
                self.path.close()

    def _fail(self, reason: str) -> None:
        """Mark the connection dead (once), drop it from the pool, wake both threads and fail
        every pending transfer."""
        with self._lock:
            if self.error is not None:
                return
            self.error = KVTransportError(f"connection to the KV receiver at {self.address} failed: {reason}")
            pending, self._pending = list(self._pending.values()), {}
        self._sender._dropped(self)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._queue.put(None)
        for transfer in pending:
            transfer.finish(KVTransportError(f"transfer of {transfer.request_id!r} lost: {self.error}; "
                                             f"retry it with a new open(), which reconnects"))


class _Transfer(OutgoingTransfer):
    """One request's frames on a pooled connection."""

    def __init__(self, sender: ControlSender, conn: _Connection, request_id: str, num_blocks: int):
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


# -------------------------------------------------------------------------------------- receiver

@dataclasses.dataclass
class _Expected:
    """A request the receiver accepts frames for. ``lock`` is held while a frame is written."""

    dst_block_ids: list[int]
    on_commit: OnCommit
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    active: bool = True          # False once forgotten or committed: nothing is written any more
    error: str | None = None     # a bad frame was seen; the commit will be refused with this


_REMEMBERED = 4096      # request ids kept in each of the receiver's bounded "recently" tables


def _remember(table: OrderedDict, request_id: str, value) -> None:
    table[request_id] = value
    table.move_to_end(request_id)
    if len(table) > _REMEMBERED:
        table.popitem(last=False)


class ControlReceiver(KVReceiver):
    """Decode (and migration destination) side of every transport: a listening socket, a thread
    per connection, each connection with the payload path its handshake chose.

    ``open_wait_s`` (default: the smaller of timeout_s and 5 s) bounds how long a transfer that
    opened before its ``expect`` may hold its connection's frames (module docstring)."""

    def __init__(self, layout: KVLayout, kv: torch.Tensor, host: str = "127.0.0.1", port: int = 0, *,
                 timeout_s: float = 30.0, setting: str = "tcp", open_wait_s: float | None = None,
                 token: str | None = None):
        self.layout = layout
        self.token = token          # the cluster token: with one, only senders that prove it are served
        self.timeout_s = timeout_s
        self.open_wait_s = min(timeout_s, 5.0) if open_wait_s is None else open_wait_s
        _check_kv(kv, layout)
        self._kv = kv
        self.endpoint = local_endpoint(setting, kv)
        self._num_blocks = kv.shape[0]
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)     # notified by expect, forget and close
        self._requests: dict[str, _Expected] = {}
        self._announced: dict[str, float] = {}         # opened, not expected yet → monotonic deadline
        self._forgotten: OrderedDict[str, None] = OrderedDict()   # recently forgotten
        self._missed: OrderedDict[str, str] = OrderedDict()       # frames discarded before expect: why
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._closed = False
        self._stats = {"bytes_received": 0, "bytes_discarded": 0, "transfers_committed": 0,
                       "transfers_refused": 0}
        self._commits = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-commit")
        self._listener = socket.create_server((host, port), backlog=64)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"kv-listen {self.address}", daemon=True)
        self._acceptor.start()

    def expect(self, request_id: str, dst_block_ids: list[int], on_commit: OnCommit) -> None:
        bad = [b for b in dst_block_ids if not 0 <= b < self._num_blocks]
        if bad:
            raise ValueError(f"block ids {bad} are out of range 0..{self._num_blocks - 1}")
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already expected")
            entry = _Expected(list(dst_block_ids), on_commit)
            self._forgotten.pop(request_id, None)
            self._announced.pop(request_id, None)
            missed = self._missed.pop(request_id, None)
            if missed is not None:          # its first frames were discarded: the commit must fail
                entry.error = f"{missed}; part of its KV was discarded"
            self._requests[request_id] = entry
            self._arrived.notify_all()

    def forget(self, request_id: str) -> None:
        with self._lock:
            entry = self._requests.pop(request_id, None)
            _remember(self._forgotten, request_id, None)       # an OPEN arriving later is refused
            if self._announced.pop(request_id, None) is not None:
                _remember(self._missed, request_id, f"request {request_id!r} was forgotten before it was expected")
            self._arrived.notify_all()
        if entry is not None:
            with entry.lock:          # waits for a frame being written
                entry.active = False

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = dict(self._conns)
            self._arrived.notify_all()
        _shutdown(self._listener)     # wakes accept()
        self._acceptor.join()
        self._listener.close()
        for sock in conns:
            _shutdown(sock)
        for thread in conns.values():
            thread.join()
        self._commits.shutdown(wait=True)

    def _count(self, **deltas) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._stats[key] += value

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return                 # closed
            tune(sock, self.timeout_s)
            thread = threading.Thread(target=self._serve, args=(sock,), name=f"kv-recv {self.address}", daemon=True)
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._conns[sock] = thread
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        """Handshake, then apply frames in order until the peer goes away or close()."""
        send_lock = threading.Lock()

        def reply(ftype: FrameType, rid: str = "", text: str = "") -> None:
            with send_lock:
                try:
                    send_buffers(sock, [encode(ftype, rid, text)])
                except OSError as e:
                    log.info("could not send %s for %r: %s", ftype.name, rid, e)

        scratch = memoryview(bytearray(1 << 20))
        path = None
        try:
            path = self._handshake(sock, reply)
            while path is not None:
                wait_readable(sock)
                header, rid, text = recv_frame(sock)
                if header.ftype == FrameType.DATA:
                    self._on_data(sock, path, header, rid, text, scratch, reply)
                elif header.ftype == FrameType.COMMIT:
                    self._on_commit(rid, header.num_tokens, text, reply)
                elif header.ftype == FrameType.OPEN:
                    self._on_open(rid, reply)
                elif header.ftype == FrameType.ABORT:
                    self.forget(rid)
                else:
                    raise ProtocolError(f"unexpected {header.ftype.name} frame from a sender")
        except Exception as e:     # peer gone, timeout, protocol error, a device path's failure, close()
            if not self._closed:
                log.info("KV connection to %s closed: %s", self.address, e)
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            with send_lock:
                sock.close()
            if path is not None:
                path.close()

    def _handshake(self, sock: socket.socket, reply: Callable) -> ReceivePath | None:
        """Check the sender's HELLO and pick the transport; answer HELLO_OK or HELLO_ERR; then set
        the payload path up (SETUP) when the transport needs it. The path, or None if refused."""
        header, _, text = recv_frame(sock)
        if header.ftype != FrameType.HELLO:
            raise ProtocolError(f"expected HELLO, got {header.ftype.name}")
        hello = parse_hello(text)
        problem = hello_problem(self.layout, hello, f"on the receiver ({self.address})", "on the sender")
        transport = None
        if problem is None:
            try:
                transport = resolve(Endpoint.from_dict(hello.get("endpoint") or {}), self.endpoint)
            except TransportMismatch as e:
                problem = str(e)
            except ValueError as e:
                raise ProtocolError(f"malformed HELLO: {e}") from e
        path = None
        if problem is None:
            try:       # before HELLO_OK: a path this side cannot build is a refusal the sender can read
                path = _receive_path(transport, self._kv, self.layout, self.timeout_s)
            except Exception as e:
                problem = f"the receiver cannot run {transport}: {e}"
        if problem:
            reply(FrameType.HELLO_ERR, text=problem)
            return None
        nonce = secrets.token_hex(16)
        proof = kv_proof(self.token, str(hello.get("nonce", "")), "receiver") if self.token else ""
        reply(FrameType.HELLO_OK, text=hello_text(self.layout, self.endpoint.to_dict(), transport, nonce=nonce,
                                                  proof=proof))
        refusal = self._check_auth(sock, nonce)
        if refusal is not None:
            path.close()
            with self._lock:         # counted once there is one, like connections_<transport>
                self._stats["senders_refused"] = self._stats.get("senders_refused", 0) + 1
            log.warning("KV receiver %s refused a sender: %s", self.address, refusal)
            reply(FrameType.AUTH_ERR, text=refusal)
            return None
        reply(FrameType.AUTH_OK)
        if transport != "tcp":
            header, _, text = recv_frame(sock)
            if header.ftype != FrameType.SETUP:
                path.close()
                raise ProtocolError(f"expected SETUP, got {header.ftype.name}")
            try:
                path.accept(text)
            except Exception as e:       # a malformed offer, an NCCL init or IPC mapping that failed
                path.close()
                reply(FrameType.SETUP_ERR, text=f"{transport} set-up failed on the receiver: {e}")
                return None
            reply(FrameType.SETUP_OK)
        key = f"connections_{transport}"             # handshakes completed per transport
        with self._lock:
            self._stats[key] = self._stats.get(key, 0) + 1
        return path

    def _check_auth(self, sock: socket.socket, nonce: str) -> str | None:
        """Read the sender's AUTH frame: None when it proves the cluster token on `nonce` (or this
        receiver has none), else the refusal. Raises ProtocolError for another frame."""
        header, _, text = recv_frame(sock)
        if header.ftype != FrameType.AUTH:
            raise ProtocolError(f"expected AUTH, got {header.ftype.name}")
        if not self.token:
            return None
        try:
            presented = json.loads(text or "{}").get("proof")
        except (ValueError, AttributeError):
            presented = None
        if kv_proof_ok(self.token, nonce, "sender", presented):
            return None
        return f"the sender did not prove the cluster token ({'none sent' if not presented else 'wrong'}): " \
               f"{CLUSTER_TOKEN_FIX}"

    def _on_open(self, rid: str, reply: Callable) -> None:
        """A transfer starts. Expected already: nothing to do. Forgotten (released before its
        transfer opened): refuse it now. Otherwise announce it: its first DATA or COMMIT frame
        waits for ``expect`` (see _expected)."""
        with self._lock:
            if rid in self._requests:
                return
            if rid not in self._forgotten:
                now = time.monotonic()
                if len(self._announced) >= _REMEMBERED:      # senders that vanished after OPEN
                    self._announced = {k: d for k, d in self._announced.items() if d > now}
                self._announced[rid] = now + self.open_wait_s
                return
            reason = (f"unknown request {rid!r} at {self.address}: forgotten (lease expired, cancelled) before its "
                      f"KV transfer opened")
            _remember(self._missed, rid, reason)
        self._count(transfers_refused=1)
        reply(FrameType.NACK, rid, reason)

    def _expected(self, rid: str, reply: Callable) -> tuple[_Expected | None, bool]:
        """(the entry frames of ``rid`` go to or None to discard them, whether this call refused
        the transfer). An announced transfer waits for its ``expect`` until its deadline; past it,
        it is refused (NACK) and remembered as missed, so that a late ``expect`` cannot commit KV
        whose first frames were dropped."""
        with self._lock:
            entry = self._requests.get(rid)
            if entry is not None or rid not in self._announced:
                return entry, False
            deadline = self._announced[rid]
            while rid in self._announced and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
            entry = self._requests.get(rid)
            if entry is not None or self._announced.pop(rid, None) is None:
                return entry, False
            reason = (f"no reservation for request {rid!r} at {self.address} within {self.open_wait_s:g} s of "
                      f"its KV transfer opening")
            _remember(self._missed, rid, reason)
        self._count(transfers_refused=1)
        reply(FrameType.NACK, rid, reason)
        return None, True

    def _on_data(self, sock: socket.socket, path: ReceivePath, header: Header, rid: str, text: str,
                 scratch: memoryview, reply: Callable) -> None:
        entry, _ = self._expected(rid, reply)
        nbytes = header.payload_nbytes
        if entry is None:
            path.receive(sock, header, text, None, scratch)
            self._count(bytes_discarded=nbytes)
            return
        with entry.lock:
            if entry.active and entry.error is None:
                entry.error = self._check_data(header, entry)
            if not entry.active or entry.error:        # forgotten, or refused at commit anyway
                path.receive(sock, header, text, None, scratch)
                self._count(bytes_discarded=nbytes)
                return
            dst = entry.dst_block_ids[header.first_index:header.first_index + header.num_blocks]
            path.receive(sock, header, text, dst, scratch)
        self._count(bytes_received=nbytes)

    def _check_data(self, h: Header, entry: _Expected) -> str | None:
        """Why a DATA frame cannot be applied, or None."""
        if not 0 <= h.layer_start < h.layer_end <= self.layout.num_layers:
            return f"a DATA frame has layers [{h.layer_start}, {h.layer_end}) outside [0, {self.layout.num_layers})"
        if h.first_index + h.num_blocks > len(entry.dst_block_ids):
            return (f"a DATA frame targets logical blocks [{h.first_index}, {h.first_index + h.num_blocks}) but "
                    f"only {len(entry.dst_block_ids)} blocks were reserved; reserve enough blocks for the prompt")
        if h.payload_nbytes != h.num_blocks * (h.layer_end - h.layer_start) * self.layout.bytes_per_block_layer:
            return f"a DATA frame's payload of {h.payload_nbytes} bytes does not match its blocks and layers"
        return None

    def _on_commit(self, rid: str, num_tokens: int, text: str, reply: Callable) -> None:
        """Every earlier frame of ``rid`` is applied (frames are read in order): run on_commit off
        the connection's thread and answer ACK/NACK."""
        _, refused = self._expected(rid, reply)
        with self._lock:
            entry = self._requests.pop(rid, None)
        if entry is None:
            if refused:
                return
            with self._lock:
                counted = rid in self._missed        # refused at its OPEN already
            if not counted:
                self._count(transfers_refused=1)
            reply(FrameType.NACK, rid, f"unknown request {rid!r} at {self.address}: never expected, "
                                       f"forgotten (lease expired, cancelled) or aborted")
            return
        with entry.lock:
            entry.active = False
        self._commits.submit(self._finish_commit, entry, rid, num_tokens, text, reply)

    def _finish_commit(self, entry: _Expected, rid: str, num_tokens: int, text: str, reply: Callable) -> None:
        reason = entry.error
        if reason is None:
            try:
                reason = entry.on_commit(rid, num_tokens, json.loads(text or "{}"))
            except Exception as e:      # a bug in the callback must not kill the connection
                log.exception("on_commit for %r failed", rid)
                reason = f"on_commit raised {e!r}"
        self._count(**{"transfers_refused" if reason else "transfers_committed": 1})
        reply(FrameType.NACK if reason else FrameType.ACK, rid, reason or "")


def _shutdown(sock: socket.socket) -> None:
    """Shut a socket down both ways, waking any thread blocked on it; ignore an already-closed one."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
