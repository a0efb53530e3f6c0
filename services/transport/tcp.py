"""The ``tcp`` KV transport: framed raw sockets, zero-copy on both ends (wire format in framing.py).

Sender: one pooled connection per receiver address. ``push`` only queues memoryviews of the
cache's memory; the connection's writer thread hands them to ``sendmsg`` as they are (no copy),
and its reader thread matches ACK/NACK frames to committing transfers by request id. Receiver: a
thread per accepted connection reads frames in order and ``recv_into``s each block straight into
``kv[dst_block_ids[i], layer_start:layer_end]``; ``on_commit`` callbacks run on a small pool so a
slow callback does not stall the connection.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .base import (KVHandshakeError, KVLayout, KVReceiver, KVSender, KVTransportError, OutgoingTransfer,
                   TransferStats)
from .framing import (FrameType, Header, ProtocolError, discard, encode, hello_problem, hello_text, recv_buffers,
                      recv_frame, send_buffers, tune, wait_readable)

log = logging.getLogger(__name__)

OnCommit = Callable[[str, int, dict], "str | None"]


def _cache_bytes(kv: torch.Tensor, layout: KVLayout) -> memoryview:
    """A flat uint8 view of the whole cache (shares its memory). Raises ValueError if ``kv`` does
    not match ``layout`` or is not a contiguous CPU tensor."""
    if KVLayout.of(kv, layout.model_id) != layout:
        raise ValueError(f"kv {tuple(kv.shape)} {kv.dtype} does not match the transport's {layout}")
    if kv.device.type != "cpu" or not kv.is_contiguous():
        raise ValueError("the tcp transport needs a contiguous CPU kv tensor")
    return memoryview(kv.view(-1).view(torch.uint8).numpy())   # bf16 has no numpy dtype: bytes


def _block_slice(layout: KVLayout, block: int, layer_start: int, layer_end: int) -> slice:
    """Byte range of ``kv[block, layer_start:layer_end]`` in the flat cache."""
    start = (block * layout.num_layers + layer_start) * layout.bytes_per_block_layer
    return slice(start, start + (layer_end - layer_start) * layout.bytes_per_block_layer)


# ---------------------------------------------------------------------------------------- sender

class TcpSender(KVSender):
    """Prefill side of the tcp transport. Thread-safe."""

    def __init__(self, layout: KVLayout, *, timeout_s: float = 30.0):
        self.layout = layout
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conns: dict[str, _Connection] = {}
        self._connecting: dict[str, threading.Lock] = {}     # one connect at a time per address
        self._totals = {"bytes_sent": 0, "transfers": 0, "failures": 0, "aborts": 0, "window_s_total": 0.0}
        self._closed = False

    def open(self, request_id: str, address: str, kv: torch.Tensor) -> OutgoingTransfer:
        if self._closed:
            raise RuntimeError("open() on a closed KV sender")
        cache = _cache_bytes(kv, self.layout)
        transfer = _Transfer(self, self._connection(address), request_id, cache, kv.shape[0])
        transfer.conn.register(transfer)
        return transfer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close("the sender was closed")

    def stats(self) -> dict:
        with self._lock:
            return dict(self._totals, connections=len(self._conns))

    def _connection(self, address: str) -> "_Connection":
        """The live pooled connection to ``address``, connecting and handshaking if needed."""
        with self._lock:
            connecting = self._connecting.setdefault(address, threading.Lock())
        with connecting:
            with self._lock:
                conn = self._conns.get(address)
            if conn is None or conn.error is not None:
                conn = _Connection(address, self.layout, self.timeout_s, self)
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
    resolves committing transfers on ACK/NACK. Any socket error fails every pending transfer."""

    def __init__(self, address: str, layout: KVLayout, timeout_s: float, sender: TcpSender):
        self.address = address
        self.error: KVTransportError | None = None       # set once, when the connection fails
        self._sender = sender
        self._lock = threading.Lock()
        self._pending: dict[str, _Transfer] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()   # (transfer | None, buffers, nbytes) | None
        self.sock = self._connect(layout, timeout_s)
        self._writer = threading.Thread(target=self._write_loop, name=f"kv-send {address}", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"kv-ack {address}", daemon=True)
        self._writer.start()
        self._reader.start()

    def _connect(self, layout: KVLayout, timeout_s: float) -> socket.socket:
        """Connect and handshake: both ends check the other's HELLO."""
        host, _, port = self.address.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        except (OSError, ValueError) as e:
            raise KVTransportError(f"cannot connect to the KV receiver at {self.address}: {e}; check that "
                                   f"the decode worker is up and this is its data-plane address") from e
        try:
            tune(sock, timeout_s)
            send_buffers(sock, [encode(FrameType.HELLO, text=hello_text(layout))])
            header, _, text = recv_frame(sock)
            if header.ftype == FrameType.HELLO_OK:
                text = hello_problem(layout, text, "on the sender", f"on the receiver ({self.address})")
            elif header.ftype != FrameType.HELLO_ERR:
                raise ProtocolError(f"expected HELLO_OK or HELLO_ERR, got {header.ftype.name}")
        except OSError as e:
            sock.close()
            raise KVTransportError(f"KV handshake with {self.address} failed: {e}") from e
        if text:
            sock.close()
            raise KVHandshakeError(f"KV handshake with the receiver at {self.address} refused: {text}")
        return sock

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

    def send(self, transfer: "_Transfer | None", buffers: list, nbytes: int = 0) -> None:
        """Queue one frame (header and payload buffers). Frames of an aborted ``transfer`` are
        dropped unsent; ``transfer=None`` frames are always sent."""
        self._queue.put((transfer, buffers, nbytes))

    def close(self, reason: str) -> None:
        """Fail pending transfers, close the socket and join both threads."""
        self._fail(reason)
        self._reader.join()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            transfer, buffers, nbytes = item
            if transfer is not None:
                if transfer.aborted:
                    continue
                if transfer.t_first is None:
                    transfer.t_first = time.perf_counter()
            try:
                send_buffers(self.sock, buffers)
            except OSError as e:
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

    def __init__(self, sender: TcpSender, conn: _Connection, request_id: str, cache: memoryview,
                 num_blocks: int):
        self.request_id = request_id
        self.conn = conn
        self.aborted = False                 # read by the writer: drop this transfer's queued frames
        self.t_first: float | None = None    # set by the writer when it sends this transfer's first frame
        self._sender = sender
        self._layout = sender.layout
        self._cache = cache                  # flat bytes of the sender's kv
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
        views = [self._cache[_block_slice(self._layout, b, layer_start, layer_end)] for b in src_block_ids]
        nbytes = len(views) * len(views[0])
        head = encode(FrameType.DATA, self.request_id, first_index=first_index, num_blocks=len(views),
                      layer_start=layer_start, layer_end=layer_end, payload_nbytes=nbytes)
        self._bytes += nbytes
        self._frames += 1
        self.conn.send(self, [head, *views], nbytes)

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
        window = self._t_ack - self.t_first
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


class TcpReceiver(KVReceiver):
    """Decode side of the tcp transport: a listening socket, a thread per connection."""

    def __init__(self, layout: KVLayout, kv: torch.Tensor, host: str = "127.0.0.1", port: int = 0, *,
                 timeout_s: float = 30.0):
        self.layout = layout
        self.timeout_s = timeout_s
        self._cache = _cache_bytes(kv, layout)
        self._num_blocks = kv.shape[0]
        self._lock = threading.Lock()
        self._requests: dict[str, _Expected] = {}
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
            self._requests[request_id] = _Expected(list(dst_block_ids), on_commit)

    def forget(self, request_id: str) -> None:
        with self._lock:
            entry = self._requests.pop(request_id, None)
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
        try:
            if self._handshake(sock, reply):
                while True:
                    wait_readable(sock)
                    header, rid, text = recv_frame(sock)
                    if header.ftype == FrameType.DATA:
                        self._on_data(sock, header, rid, scratch)
                    elif header.ftype == FrameType.COMMIT:
                        self._on_commit(rid, header.num_tokens, text, reply)
                    elif header.ftype == FrameType.ABORT:
                        self.forget(rid)
                    else:
                        raise ProtocolError(f"unexpected {header.ftype.name} frame from a sender")
        except (OSError, ValueError) as e:     # peer gone, timeout, protocol error, close()
            if not self._closed:
                log.info("KV connection to %s closed: %s", self.address, e)
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            with send_lock:
                sock.close()

    def _handshake(self, sock: socket.socket, reply: Callable) -> bool:
        """Check the sender's HELLO; answer HELLO_OK (True) or HELLO_ERR (False)."""
        header, _, text = recv_frame(sock)
        if header.ftype != FrameType.HELLO:
            raise ProtocolError(f"expected HELLO, got {header.ftype.name}")
        problem = hello_problem(self.layout, text, f"on the receiver ({self.address})", "on the sender")
        reply(FrameType.HELLO_ERR if problem else FrameType.HELLO_OK, text=problem or hello_text(self.layout))
        return problem is None

    def _on_data(self, sock: socket.socket, header: Header, rid: str, scratch: memoryview) -> None:
        with self._lock:
            entry = self._requests.get(rid)
        nbytes = header.payload_nbytes
        if entry is None:
            discard(sock, nbytes, scratch)
            self._count(bytes_discarded=nbytes)
            return
        with entry.lock:
            if entry.active and entry.error is None:
                entry.error = self._check_data(header, entry)
            if not entry.active or entry.error:        # forgotten, or refused at commit anyway
                discard(sock, nbytes, scratch)
                self._count(bytes_discarded=nbytes)
                return
            dst = entry.dst_block_ids[header.first_index:header.first_index + header.num_blocks]
            recv_buffers(sock, [self._cache[_block_slice(self.layout, b, header.layer_start, header.layer_end)]
                                for b in dst])
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
        with self._lock:
            entry = self._requests.pop(rid, None)
        if entry is None:
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
