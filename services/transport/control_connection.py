"""One pooled connection of the KV control plane's sending end (control_sender.py) to one
receiver address: its handshake, the payload path it chose, a writer thread that emits frames in
push order and a reader thread that matches ACK/NACK frames to committing transfers.
"""
from __future__ import annotations

import json
import logging
import queue
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING

import torch

from services.auth import CLUSTER_TOKEN_FIX, kv_proof, kv_proof_ok

from .base import KVHandshakeError, KVLayout, KVTransportError
from .framing import (FrameType, ProtocolError, encode, hello_problem, hello_text, parse_hello, recv_frame,
                      send_buffers, tune, wait_readable)
from .paths import SendPath
from .selection import Endpoint, TransportMismatch, local_endpoint, resolve
from .control_common import send_path

if TYPE_CHECKING:                       # the sender owns its connections; they call back into it
    from .control_sender import ControlSender, Transfer

log = logging.getLogger(__name__)


class SenderConnection:
    """One connection to a receiver: a writer thread drains the frame queue, a reader thread
    resolves committing transfers on ACK/NACK. Any socket or path error fails every pending
    transfer. ``path`` carries DATA payloads by the transport the handshake chose."""

    def __init__(self, address: str, layout: KVLayout, timeout_s: float, sender: ControlSender, kv: torch.Tensor):
        self.address = address
        self.error: KVTransportError | None = None       # set once, when the connection fails
        self._sender = sender
        self._lock = threading.Lock()
        self._pending: dict[str, Transfer] = {}
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
        self.path = send_path(self.transport, kv, layout, timeout_s, watchdog,
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

    def register(self, transfer: "Transfer") -> None:
        """Track a new transfer. Raises KVTransportError if the connection has just failed,
        ValueError if the request id is already in flight here."""
        with self._lock:
            if self.error is not None:
                raise self.error
            if transfer.request_id in self._pending:
                raise ValueError(f"request {transfer.request_id!r} already has a transfer to {self.address}")
            self._pending[transfer.request_id] = transfer

    def unregister(self, transfer: "Transfer") -> bool:
        """Stop tracking ``transfer``; True if this call removed it (the caller then finishes it)."""
        with self._lock:
            if self._pending.get(transfer.request_id) is not transfer:
                return False
            del self._pending[transfer.request_id]
            return True

    def send(self, transfer: "Transfer | None", buffers: list, nbytes: int = 0, data: tuple | None = None) -> None:
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
