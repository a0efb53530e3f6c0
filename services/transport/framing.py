"""Wire format of the KV control plane (every transport's socket) and blocking socket helpers.

Every frame is a fixed 40-byte little-endian header, then ``rid_len`` bytes of request id (UTF-8),
``text_len`` bytes of text (JSON or a message) and ``payload_nbytes`` bytes of KV payload::

    magic "TK" | type u8 | pad | rid_len u16 | layer_start u16 | layer_end u16 | pad u16
    | first_index u32 | num_blocks u32 | text_len u32 | num_tokens u64 | payload_nbytes u64

A DATA payload is the concatenation of ``kv[b, layer_start:layer_end]`` for its ``num_blocks``
blocks, in order; ``payload_nbytes`` counts it whichever way it travels, but only the ``tcp``
transport sends it on the socket (``nccl`` sends it through NCCL, ``cuda_ipc`` does not send it:
its text names the sender's block ids). A connection opens with HELLO → HELLO_OK/HELLO_ERR, where
both sides state their layout and endpoint (selection.py) and the receiver names the transport,
then AUTH → AUTH_OK/AUTH_ERR: each side proves the cluster token on the other's nonce (HELLO and
HELLO_OK carry them; services/auth.py); ``nccl`` and ``cuda_ipc`` then exchange SETUP → SETUP_OK/SETUP_ERR. Each transfer then sends OPEN(rid),
its DATA frames, and COMMIT (answered ACK or NACK) or ABORT. Sockets are in timeout mode, so every
send and receive below raises ``TimeoutError`` (an ``OSError``) when the peer stalls for longer than the socket's timeout.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import select
import socket
import struct
from typing import NamedTuple

from .base import KVLayout

PROTOCOL_VERSION = 4
MAGIC = b"TK"
SOCKET_BUFFER_BYTES = 4 << 20
_IOV_MAX = 1024                     # buffers per sendmsg call (Linux UIO_MAXIOV)
_HEADER = struct.Struct("<2sBxHHH2xIIIQQ")
HEADER_SIZE = _HEADER.size


class FrameType(enum.IntEnum):
    HELLO = 1        # text: {"protocol": int, "layout": KVLayout fields, "endpoint": Endpoint fields}
    HELLO_OK = 2     # text: as HELLO, plus "transport": the transport the receiver chose
    HELLO_ERR = 3    # text: why the receiver refused
    DATA = 4         # rid, first_index, num_blocks, layer_start, layer_end, payload
    COMMIT = 5       # rid, num_tokens, text: meta JSON
    ACK = 6          # rid
    NACK = 7         # rid, text: reason
    ABORT = 8        # rid, text: reason
    SETUP = 9        # text: the transport's set-up (nccl: unique id; cuda_ipc: the exported cache)
    SETUP_OK = 10
    SETUP_ERR = 11   # text: why the receiver could not set the transport up
    OPEN = 12        # rid: a transfer starts; its reservation may still be on its way (see ControlReceiver)
    AUTH = 13        # text: {"proof": the sender's answer to the receiver's nonce, "" without a cluster token}
    AUTH_OK = 14
    AUTH_ERR = 15    # text: why the receiver refused the sender's proof


class Header(NamedTuple):
    ftype: FrameType
    rid_len: int = 0
    layer_start: int = 0
    layer_end: int = 0
    first_index: int = 0
    num_blocks: int = 0
    text_len: int = 0
    num_tokens: int = 0
    payload_nbytes: int = 0


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame of this protocol."""


def encode(ftype: FrameType, request_id: str = "", text: str = "", **fields: int) -> bytes:
    """Header and body of one frame (the payload, if any, is sent separately after it)."""
    rid, body = request_id.encode(), text.encode()
    h = Header(ftype, rid_len=len(rid), text_len=len(body), **fields)
    return _HEADER.pack(MAGIC, h.ftype, h.rid_len, h.layer_start, h.layer_end, h.first_index,
                        h.num_blocks, h.text_len, h.num_tokens, h.payload_nbytes) + rid + body


def tune(sock: socket.socket, timeout_s: float) -> None:
    """Low latency, big kernel buffers, and ``timeout_s`` on every blocking call."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.settimeout(timeout_s)


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """Send every byte of ``buffers`` (bytes or memoryviews) in order, without copying them.

    sendmsg may send only part of what it is given; the rest is re-sent from where it stopped.
    """
    _transfer(sock.sendmsg, buffers)


def recv_buffers(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Fill every byte of the writable ``buffers`` in order, reading straight into them (scatter
    read: one recvmsg_into call fills as many as the socket has data for). Raises
    ConnectionError if the peer closes first."""
    _transfer(lambda views: sock.recvmsg_into(views)[0], buffers)


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` exactly. Raises ConnectionError if the peer closes first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def _transfer(call, buffers: list) -> None:
    """Run ``call(views) -> bytes moved`` until every byte of ``buffers`` has moved, resuming a
    partly moved buffer where it stopped."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    i = 0
    while i < len(views):
        moved = call(views[i:i + _IOV_MAX])
        if moved == 0:
            raise ConnectionError("peer closed the connection")
        while i < len(views) and moved >= len(views[i]):
            moved -= len(views[i])
            i += 1
        if moved:
            views[i] = views[i][moved:]


def discard(sock: socket.socket, nbytes: int, scratch: memoryview) -> None:
    """Read and drop ``nbytes`` bytes, ``len(scratch)`` at a time."""
    while nbytes > 0:
        n = min(nbytes, len(scratch))
        recv_into(sock, scratch[:n])
        nbytes -= n


def wait_readable(sock: socket.socket) -> None:
    """Block, without a timeout, until the socket has data, EOF or an error.

    For an idle connection waiting for its next frame; ``sock.shutdown()`` from another thread
    wakes it.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.poll()


def recv_frame(sock: socket.socket) -> tuple[Header, str, str]:
    """Read one frame's header, request id and text (not its payload).

    Raises ProtocolError on bad magic or type, ConnectionError on EOF, TimeoutError on a stall.
    """
    raw = bytearray(HEADER_SIZE)
    recv_into(sock, memoryview(raw))
    magic, ftype, *rest = _HEADER.unpack(raw)
    if magic != MAGIC or ftype not in FrameType._value2member_map_:
        raise ProtocolError(f"not a Tandem KV frame (magic {magic!r}, type {ftype})")
    header = Header(FrameType(ftype), *rest)
    body = bytearray(header.rid_len + header.text_len)
    recv_into(sock, memoryview(body))
    return header, body[:header.rid_len].decode(), body[header.rid_len:].decode()


def hello_text(layout: KVLayout, endpoint: dict, transport: str | None = None, **auth) -> str:
    """Text of a HELLO (sender) or HELLO_OK (receiver, with the chosen ``transport``); ``auth``:
    this side's ``nonce`` and (HELLO_OK, with a cluster token) its ``proof``."""
    hello = {"protocol": PROTOCOL_VERSION, "layout": dataclasses.asdict(layout), "endpoint": endpoint, **auth}
    if transport is not None:
        hello["transport"] = transport
    return json.dumps(hello)


def parse_hello(text: str) -> dict:
    """The HELLO/HELLO_OK fields. Raises ProtocolError when the text is not one."""
    try:
        hello = json.loads(text)
        if not isinstance(hello, dict) or "protocol" not in hello:
            raise ValueError("no protocol version")
        return hello
    except ValueError as e:
        raise ProtocolError(f"malformed HELLO: {e}") from e


def hello_problem(layout: KVLayout, hello: dict, here: str, there: str) -> str | None:
    """Why the peer's HELLO fields are incompatible with ``layout`` (labelled ``here``), or None.
    Raises ProtocolError when the fields are malformed."""
    if hello["protocol"] != PROTOCOL_VERSION:
        return (f"protocol version differs: {PROTOCOL_VERSION} {here}, {hello['protocol']} {there}; "
                f"run the same Tandem version on both")
    try:
        return layout.mismatch(KVLayout(**hello["layout"]), here=here, there=there)
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"malformed HELLO: {e}") from e
