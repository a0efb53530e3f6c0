"""The tcp KV transport over real loopback sockets: both ends in this process, or the receiver in
a subprocess where a test kills it. No mocks, no wall-time assertions."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.transport import (KVHandshakeError, KVLayout, KVTransportError, TRANSPORTS, make_receiver,
                                make_sender)
from services.transport.framing import PROTOCOL_VERSION, FrameType, encode, recv_frame

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_BLOCKS, LAYERS, BLOCK, HEADS, HEAD_DIM = 32, 4, 16, 2, 8


def make_kv(dtype=torch.float32, block_size=BLOCK, seed=0, fill=None):
    """kv: [blocks, layers, 2, block_size, kv_heads, head_dim], random (or all ``fill``)."""
    shape = (NUM_BLOCKS, LAYERS, 2, block_size, HEADS, HEAD_DIM)
    if fill is not None:
        return torch.full(shape, fill, dtype=dtype)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def pair():
    """pair(dtype) -> (sender kv, receiver kv, sender, receiver); all closed after the test."""
    opened = []

    def make(dtype=torch.float32):
        src, dst = make_kv(dtype), make_kv(dtype, fill=0)
        layout = KVLayout.of(src, "tiny")
        receiver = make_receiver("tcp", layout, dst, timeout_s=10)
        sender = make_sender("tcp", layout, timeout_s=10)
        opened.extend([sender, receiver])
        return src, dst, sender, receiver

    yield make
    for endpoint in opened:
        endpoint.close()


def ack(commits):
    """An on_commit that records its arguments and ACKs."""
    return lambda rid, num_tokens, meta: commits.append((rid, num_tokens, meta))


def test_layout_of_mismatch_and_block_bytes():
    kv = make_kv(torch.bfloat16)
    layout = KVLayout.of(kv, "m")
    assert layout == KVLayout("m", "bfloat16", BLOCK, LAYERS, HEADS, HEAD_DIM)
    assert layout.bytes_per_block_layer == kv[0, 0].numel() * 2
    assert layout.mismatch(layout) is None
    other = dataclasses.replace(layout, dtype="float16", block_size=32)
    message = layout.mismatch(other)
    assert message.startswith("dtype differs") and "'bfloat16'" in message and "'float16'" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_in_layer_groups_and_chunks(pair, dtype):
    src, dst, sender, receiver = pair(dtype)
    src_ids, dst_ids = [9, 4, 30, 17, 2], [0, 21, 5, 13, 28]
    commits = []
    receiver.expect("r1", dst_ids, ack(commits))
    transfer = sender.open("r1", receiver.address, src)
    # chunk 1 fills logical blocks 0, 1 and part of 2, pushed in two layer groups
    transfer.push(src_ids[:3], 0, 0, 2)
    transfer.push(src_ids[:3], 0, 2, LAYERS)
    src[src_ids[2]] = torch.randn(src[0].shape).to(dtype)      # chunk 2 completes block 2
    # chunk 2 re-pushes the partial block 2 with blocks 3 and 4, one layer at a time
    for layer in range(LAYERS):
        transfer.push(src_ids[2:], 2, layer, layer + 1)
    stats = transfer.commit(77, {"first_token": 5}, timeout=10)

    assert torch.equal(dst[dst_ids], src[src_ids])
    untouched = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
    assert not dst[untouched].any()
    assert commits == [("r1", 77, {"first_token": 5})]
    block_layer = KVLayout.of(src, "tiny").bytes_per_block_layer
    assert stats.bytes == (3 * LAYERS + 3 * LAYERS) * block_layer
    assert stats.num_frames == 2 + LAYERS and stats.window_s > 0
    assert sender.stats()["bytes_sent"] == stats.bytes and sender.stats()["transfers"] == 1
    assert receiver.stats()["bytes_received"] == stats.bytes
    assert receiver.stats()["transfers_committed"] == 1


@pytest.mark.parametrize("field, sender_kv, sender_model, ours, theirs", [
    ("block_size", lambda: make_kv(block_size=32), "tiny", "16", "32"),
    ("dtype", lambda: make_kv(torch.bfloat16), "tiny", "'float32'", "'bfloat16'"),
    ("model_id", lambda: make_kv(), "other-model", "'tiny'", "'other-model'"),
])
def test_handshake_mismatch_names_field_and_both_values(field, sender_kv, sender_model, ours, theirs):
    dst = make_kv(fill=0)
    receiver = make_receiver("tcp", KVLayout.of(dst, "tiny"), dst)
    kv = sender_kv()
    sender = make_sender("tcp", KVLayout.of(kv, sender_model))
    try:
        with pytest.raises(KVHandshakeError) as info:
            sender.open("r1", receiver.address, kv)
        message = str(info.value)
        assert field in message and f"{ours} on the receiver" in message and f"{theirs} on the sender" in message
    finally:
        sender.close()
        receiver.close()


def test_handshake_refuses_another_protocol_version(pair):
    src, _, _, receiver = pair()
    host, port = receiver.address.rsplit(":", 1)
    hello = json.dumps({"protocol": 99, "layout": dataclasses.asdict(KVLayout.of(src, "tiny"))})
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(encode(FrameType.HELLO, text=hello))
        header, _, text = recv_frame(sock)
    assert header.ftype == FrameType.HELLO_ERR
    assert f"protocol version differs: {PROTOCOL_VERSION} on the receiver" in text and "99 on the sender" in text


def test_commit_of_unknown_or_forgotten_request_is_refused(pair):
    src, _, sender, receiver = pair()
    receiver.open_wait_s = 0.2                  # an opened transfer waits this long for its expect()
    with pytest.raises(KVTransportError, match="no reservation for request 'never'.* within 0.2 s"):
        sender.open("never", receiver.address, src).commit(1, {}, timeout=10)

    receiver.expect("gone", [0], ack([]))
    transfer = sender.open("gone", receiver.address, src)
    transfer.push([1], 0, 0, LAYERS)
    receiver.forget("gone")
    with pytest.raises(KVTransportError, match="unknown request 'gone'"):
        transfer.commit(1, {}, timeout=10)
    assert receiver.stats()["transfers_refused"] == 2
    assert sender.stats()["failures"] == 2


def test_a_transfer_may_open_and_push_before_the_receiver_expects_it(pair):
    """The decode instance reserves while the prefill instance computes: the receiver holds the
    first frames of an opened transfer until expect() lands, then applies them all."""
    src, dst, sender, receiver = pair()
    transfer = sender.open("early", receiver.address, src)
    transfer.push([1, 2], 0, 0, LAYERS)
    transfer.push([3], 2, 0, 2)
    commits = []
    expecting = threading.Timer(0.2, receiver.expect, args=("early", [7, 8, 9], ack(commits)))
    expecting.start()
    transfer.push([3], 2, 2, LAYERS)
    stats = transfer.commit(40, {"first_token_id": 5}, timeout=10)
    expecting.join()
    assert commits == [("early", 40, {"first_token_id": 5})] and stats.bytes > 0
    assert torch.equal(dst[[7, 8, 9]], src[[1, 2, 3]])
    assert receiver.stats()["bytes_discarded"] == 0


def test_an_opened_transfer_whose_expect_comes_too_late_is_refused_and_stays_refused(pair):
    src, dst, sender, receiver = pair()
    receiver.open_wait_s = 0.2
    transfer = sender.open("late", receiver.address, src)
    transfer.push([1], 0, 0, LAYERS)         # held, then discarded once the wait runs out
    with pytest.raises(KVTransportError, match="no reservation for request 'late'"):
        transfer.commit(16, {}, timeout=10)
    receiver.expect("late", [4], ack([]))      # too late: a second sender must not commit into it
    again = sender.open("late", receiver.address, src)
    again.push([2], 0, 0, LAYERS)
    # Refused either way: as "part of its KV was discarded" (the late expect carries the miss), or,
    # when the first transfer's own COMMIT frame reaches the receiver after the late expect (its
    # connection thread was still behind the refused DATA frame: seen on a loaded host), that stale
    # commit is the one NACKed with the miss and takes the entry with it, so this one is "unknown".
    with pytest.raises(KVTransportError, match="part of its KV was discarded|never expected"):
        again.commit(16, {}, timeout=10)
    assert torch.count_nonzero(dst[4]) == 0 or not torch.equal(dst[4], src[1])


def test_a_transfer_opening_after_its_request_was_forgotten_is_refused_at_once(pair):
    src, _, sender, receiver = pair()
    receiver.open_wait_s = 60.0                # a refusal must not wait for it
    receiver.forget("cancelled")               # e.g. the decode stream was cancelled first
    transfer = sender.open("cancelled", receiver.address, src)
    with pytest.raises(KVTransportError, match="unknown request .cancelled.*before its KV transfer opened"):
        transfer.commit(16, {}, timeout=10)
    receiver.expect("other", [0], ack(commits := []))    # the connection serves on at once
    later = sender.open("other", receiver.address, src)
    later.push([5], 0, 0, LAYERS)
    later.commit(3, {}, timeout=10)
    assert commits == [("other", 3, {})]


def test_on_commit_reason_is_a_nack(pair):
    src, dst, sender, receiver = pair()
    receiver.expect("r1", [3], lambda rid, n, meta: "lease expired")
    transfer = sender.open("r1", receiver.address, src)
    transfer.push([1], 0, 0, LAYERS)
    with pytest.raises(KVTransportError, match="lease expired"):
        transfer.commit(16, {}, timeout=10)
    assert receiver.stats() == {"bytes_received": LAYERS * KVLayout.of(src, "tiny").bytes_per_block_layer,
                                "bytes_discarded": 0,
                                "transfers_committed": 0, "transfers_refused": 1, "connections_tcp": 1}


def test_forget_while_data_flows_stops_every_write(pair):
    src, dst, sender, receiver = pair()
    dst_ids = list(range(8))
    receiver.expect("r1", dst_ids, ack([]))
    transfer = sender.open("r1", receiver.address, src)
    for _ in range(50):
        transfer.push(list(range(8, 16)), 0, 0, LAYERS)
    # the receiver must have taken the OPEN and some DATA first: forgotten before its OPEN, the
    # transfer is refused at OPEN and the sender drops its frames unsent (another test covers that)
    deadline = time.monotonic() + 10
    while receiver.stats()["bytes_received"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    receiver.forget("r1")                   # frames are in flight, maybe one being written
    dst[dst_ids] = 7.0                      # sentinel: nothing may overwrite it from now on
    for _ in range(50):
        transfer.push(list(range(8, 16)), 0, 0, LAYERS)
    with pytest.raises(KVTransportError, match="unknown request"):
        transfer.commit(1, {}, timeout=10)  # the receiver read every earlier frame before this
    assert bool((dst[dst_ids] == 7.0).all())
    assert receiver.stats()["bytes_discarded"] > 0


def test_abort_drops_frames_and_the_receiver_forgets(pair):
    src, dst, sender, receiver = pair()
    receiver.expect("r1", [0, 1], ack([]))
    transfer = sender.open("r1", receiver.address, src)
    transfer.push([5, 6], 0, 0, LAYERS)
    transfer.abort("cancelled")
    transfer.abort("again")                 # idempotent
    with pytest.raises(RuntimeError):
        transfer.push([5], 0, 0, 1)
    # a later transfer on the same connection commits only after the ABORT frame was applied
    receiver.expect("r2", [2], ack([]))
    later = sender.open("r2", receiver.address, src)
    later.push([7], 0, 0, LAYERS)
    later.commit(1, {}, timeout=10)
    receiver.expect("r1", [0, 1], ack([]))  # forgotten, so it can be expected again
    assert sender.stats()["aborts"] == 1 and sender.stats()["connections"] == 1


@pytest.mark.timeout(20)
def test_receiver_closed_mid_transfer_fails_fast_then_reconnects(pair):
    src, dst, sender, receiver = pair()
    receiver.expect("r1", [0], ack([]))
    transfer = sender.open("r1", receiver.address, src)
    transfer.push([1], 0, 0, LAYERS)
    receiver.close()
    with pytest.raises(KVTransportError, match="failed"):
        transfer.commit(1, {}, timeout=600)      # the connection loss fails it, not the timeout

    host, port = receiver.address.rsplit(":", 1)
    restarted = make_receiver("tcp", KVLayout.of(dst, "tiny"), dst, host, int(port))
    try:
        restarted.expect("r2", [4], ack([]))
        transfer = sender.open("r2", restarted.address, src)
        transfer.push([2], 0, 0, LAYERS)
        transfer.commit(1, {}, timeout=10)
        assert torch.equal(dst[4], src[2])
    finally:
        restarted.close()


RECEIVER_SCRIPT = """
import sys, threading, torch
from services.transport import KVLayout, make_receiver
kv = torch.zeros({shape})
receiver = make_receiver("tcp", KVLayout.of(kv, "tiny"), kv, port=int(sys.argv[1]))
def on_commit(rid, num_tokens, meta):
    print("committing", flush=True)
    threading.Event().wait()               # never answers: the test kills this process
receiver.expect("r1", [0, 1], on_commit)
print(receiver.address, flush=True)
threading.Event().wait()
"""


@pytest.mark.timeout(60)
def test_killed_receiver_fails_the_commit_and_a_restarted_one_works():
    src = make_kv()
    script = RECEIVER_SCRIPT.format(shape=tuple(src.shape))
    proc = subprocess.Popen([sys.executable, "-c", script, "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    sender = make_sender("tcp", KVLayout.of(src, "tiny"), timeout_s=10)
    try:
        address = proc.stdout.readline().strip()
        transfer = sender.open("r1", address, src)
        transfer.push([3, 4], 0, 0, LAYERS)
        with ThreadPoolExecutor(1) as pool:
            commit = pool.submit(transfer.commit, 1, {}, 600)
            assert proc.stdout.readline().strip() == "committing"
            proc.kill()
            with pytest.raises(KVTransportError, match="failed"):
                commit.result()
        proc.wait()

        dst = make_kv(fill=0)
        restarted = make_receiver("tcp", KVLayout.of(dst, "tiny"), dst, port=int(address.rsplit(":", 1)[1]))
        try:
            restarted.expect("r1", [6, 7], ack([]))
            transfer = sender.open("r1", address, src)
            transfer.push([3, 4], 0, 0, LAYERS)
            transfer.commit(1, {}, timeout=10)
            assert torch.equal(dst[[6, 7]], src[[3, 4]])
        finally:
            restarted.close()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        sender.close()


def test_commit_times_out_when_the_receiver_never_acks(pair):
    src, dst, sender, receiver = pair()
    release = threading.Event()
    receiver.expect("slow", [0], lambda rid, n, meta: release.wait())
    transfer = sender.open("slow", receiver.address, src)
    transfer.push([1], 0, 0, LAYERS)
    try:
        with pytest.raises(KVTransportError, match="timeout"):
            transfer.commit(1, {}, timeout=0.2)
    finally:
        release.set()
    receiver.expect("next", [2], ack([]))       # the connection is still usable
    later = sender.open("next", receiver.address, src)
    later.push([3], 0, 0, LAYERS)
    later.commit(1, {}, timeout=10)
    assert torch.equal(dst[2], src[3])


def test_concurrent_transfers_share_one_connection(pair):
    src, dst, sender, receiver = pair(torch.bfloat16)
    commits = []

    def run(i):
        rid, src_ids, dst_ids = f"r{i}", [2 * i, 2 * i + 1], [31 - 2 * i, 30 - 2 * i]
        receiver.expect(rid, dst_ids, ack(commits))
        transfer = sender.open(rid, receiver.address, src)
        for layer in range(LAYERS):
            transfer.push(src_ids[:1], 0, layer, layer + 1)
            transfer.push(src_ids[1:], 1, layer, layer + 1)
        return transfer.commit(i, {"i": i}, timeout=10)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    for i in range(8):
        assert torch.equal(dst[[31 - 2 * i, 30 - 2 * i]], src[[2 * i, 2 * i + 1]])
    assert sorted(commits) == sorted((f"r{i}", i, {"i": i}) for i in range(8))
    assert sum(r.bytes for r in results) == receiver.stats()["bytes_received"]
    assert sender.stats()["connections"] == 1 and sender.stats()["transfers"] == 8


def test_bad_arguments(pair):
    src, _, sender, receiver = pair()
    with pytest.raises(ValueError, match="out of range"):
        receiver.expect("r1", [NUM_BLOCKS], ack([]))
    transfer = sender.open("r1", receiver.address, src)
    with pytest.raises(ValueError, match="layers"):
        transfer.push([0], 0, 2, 2)
    with pytest.raises(ValueError, match="out of range"):
        transfer.push([NUM_BLOCKS], 0, 0, 1)
    with pytest.raises(ValueError, match="does not match"):
        sender.open("r2", receiver.address, make_kv(torch.bfloat16))
    transfer.abort()


def test_unknown_transport_setting_names_the_flag_and_the_known_ones():
    kv = make_kv()
    with pytest.raises(ValueError, match=r"--kv-transport 'rdma' is not one of auto, tcp, nccl, cuda_ipc"):
        make_sender("rdma", KVLayout.of(kv, "m"))
    with pytest.raises(ValueError, match="--kv-transport 'NCCL'"):
        make_receiver("NCCL", KVLayout.of(kv, "m"), kv)
    assert TRANSPORTS == ("tcp", "nccl", "cuda_ipc")
