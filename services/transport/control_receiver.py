"""The receiving end of the KV control plane (control_plane.py): ControlReceiver accepts connections,
reads each one's frames on its own thread, writes DATA into the expected blocks and answers COMMITs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from services.auth import CLUSTER_TOKEN_FIX, kv_proof, kv_proof_ok

from .base import KVLayout, KVReceiver
from .framing import (FrameType, Header, ProtocolError, encode, hello_problem, hello_text, parse_hello,
                      recv_frame, send_buffers, tune, wait_readable)
from .paths import ReceivePath
from .selection import Endpoint, TransportMismatch, local_endpoint, resolve
from .control_common import OnCommit, check_kv, receive_path, shutdown_socket

log = logging.getLogger(__name__)


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
        check_kv(kv, layout)
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
        shutdown_socket(self._listener)     # wakes accept()
        self._acceptor.join()
        self._listener.close()
        for sock in conns:
            shutdown_socket(sock)
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
                path = receive_path(transport, self._kv, self.layout, self.timeout_s)
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
