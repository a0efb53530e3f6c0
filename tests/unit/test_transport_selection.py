"""--kv-transport: the pure choice between two endpoints, and the handshake that enforces it."""
from __future__ import annotations

import json
import socket
import threading

import pytest
import torch

from services.transport import KVHandshakeError, KVLayout, make_receiver, make_sender
from services.transport.framing import FrameType, encode, hello_text, recv_frame, send_buffers
from services.transport.selection import Endpoint, TransportMismatch, local_endpoint, resolve

CPU_A = Endpoint("auto", "host-a")
CPU_B = Endpoint("auto", "host-b")


def gpu(setting="auto", host="host-a", uuid="GPU-0", nccl=True) -> Endpoint:
    return Endpoint(setting, host, "cuda", uuid, nccl)


@pytest.mark.parametrize("sender, receiver, expected", [
    (CPU_A, CPU_B, "tcp"),                                             # CPU hosts
    (CPU_A, gpu(), "tcp"),                                             # one side on the CPU
    (gpu(uuid="GPU-0"), gpu(uuid="GPU-0"), "cuda_ipc"),                # one GPU, two processes
    (gpu(uuid="GPU-0"), gpu(uuid="GPU-1"), "nccl"),                    # two GPUs of one machine
    (gpu(host="a", uuid="GPU-0"), gpu(host="b", uuid="GPU-9"), "nccl"),  # two machines
    (gpu(uuid="GPU-0", nccl=False), gpu(uuid="GPU-1"), "tcp"),         # no CuPy/NCCL on one side
    (gpu(host="a", uuid="GPU-0"), gpu(host="b", uuid="GPU-0"), "nccl"),  # same uuid string, other host
])
def test_auto_on_both_sides(sender, receiver, expected):
    assert resolve(sender, receiver) == expected
    assert resolve(receiver, sender) == expected          # symmetric: both sides derive the same


@pytest.mark.parametrize("setting", ["tcp", "nccl", "cuda_ipc"])
def test_one_explicit_side_wins_when_the_pair_can_run_it(setting):
    a = gpu(setting, uuid="GPU-0")
    b = gpu("auto", uuid="GPU-0" if setting == "cuda_ipc" else "GPU-1")
    assert resolve(a, b) == setting
    assert resolve(b, a) == setting


def test_two_different_explicit_settings_are_refused_naming_both_and_the_flag():
    with pytest.raises(TransportMismatch, match=r"'nccl' on the sender, 'tcp' on the receiver; "
                                                r"start both with the same --kv-transport \(or auto\)"):
        resolve(gpu("nccl"), gpu("tcp", uuid="GPU-1"))


@pytest.mark.parametrize("sender, receiver, why", [
    (Endpoint("nccl", "h"), Endpoint("auto", "h"), "the sender and the receiver keep their KV caches on the CPU"),
    (gpu("nccl"), Endpoint("auto", "h"), "the receiver keeps its KV cache on the CPU"),
    (gpu("nccl", uuid="GPU-0"), gpu(uuid="GPU-0"), "NCCL refuses two ranks on one device"),
    (gpu("nccl", uuid="GPU-0"), gpu(uuid="GPU-1", nccl=False), r"not installed on the receiver \(pip install .\[gpu\]\)"),
    (gpu("cuda_ipc", host="a"), gpu(host="b"), "CUDA IPC needs both processes on one machine"),
    (gpu("cuda_ipc", uuid="GPU-0"), gpu(uuid="GPU-1"), "on different GPUs"),
])
def test_an_explicit_transport_the_pair_cannot_run_is_refused_with_the_reason(sender, receiver, why):
    with pytest.raises(TransportMismatch, match=why) as info:
        resolve(sender, receiver)
    assert "use --kv-transport auto (or tcp) on both" in str(info.value)


def test_endpoint_round_trip_and_malformed():
    ep = gpu("nccl")
    assert Endpoint.from_dict(json.loads(json.dumps(ep.to_dict()))) == ep
    with pytest.raises(ValueError, match="malformed endpoint"):
        Endpoint.from_dict({"setting": "auto"})
    with pytest.raises(ValueError, match="--kv-transport 'ib'"):
        Endpoint.from_dict(dict(ep.to_dict(), setting="ib"))


def test_local_endpoint_of_a_cpu_cache_never_touches_cuda():
    ep = local_endpoint("auto", torch.zeros(2, 1, 2, 4, 1, 8))
    assert (ep.device, ep.gpu_uuid, ep.nccl) == ("cpu", "", False)
    assert not torch.cuda.is_initialized()


def _kv():
    return torch.zeros(8, 2, 2, 4, 1, 8)          # [blocks, layers, 2, block_size, kv_heads, head_dim]


@pytest.mark.parametrize("send_setting, recv_setting", [("auto", "auto"), ("tcp", "auto"), ("auto", "tcp")])
def test_cpu_peers_agree_on_tcp_and_move_kv(send_setting, recv_setting):
    src, dst = _kv(), _kv()
    src.copy_(torch.arange(src.numel(), dtype=torch.float32).view_as(src))
    layout = KVLayout.of(src, "tiny")
    committed = threading.Event()
    receiver = make_receiver(recv_setting, layout, dst, timeout_s=10)
    sender = make_sender(send_setting, layout, timeout_s=10)
    try:
        receiver.expect("r", [5, 6], lambda *_: committed.set())
        transfer = sender.open("r", receiver.address, src)
        transfer.push([1, 2], 0, 0, 2)
        transfer.commit(8, {}, timeout=10)
        assert committed.is_set()
        assert torch.equal(dst[5:7], src[1:3])
        assert receiver.stats()["connections_tcp"] == 1
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("send_setting, recv_setting, message", [
    ("nccl", "auto", "--kv-transport nccl cannot connect these peers: the sender and the receiver keep their KV "
                     "caches on the CPU"),
    ("auto", "cuda_ipc", "--kv-transport cuda_ipc cannot connect these peers"),
    ("tcp", "nccl", "kv transport differs: 'tcp' on the sender, 'nccl' on the receiver"),
])
def test_handshake_refuses_a_transport_the_peers_cannot_agree_on(send_setting, recv_setting, message):
    kv = _kv()
    layout = KVLayout.of(kv, "tiny")
    receiver = make_receiver(recv_setting, layout, kv, timeout_s=10)
    sender = make_sender(send_setting, layout, timeout_s=10)
    try:
        receiver.expect("r", [0], lambda *_: None)
        with pytest.raises(KVHandshakeError, match="refused: " + message.replace("(", r"\(").replace(")", r"\)")):
            sender.open("r", receiver.address, kv)
        assert sender.stats()["connections"] == 0
    finally:
        sender.close()
        receiver.close()


def test_sender_refuses_a_receiver_that_names_another_transport():
    """A receiver (of another version) answering HELLO_OK with a transport this side does not
    derive is refused instead of guessed at."""
    kv = _kv()
    layout = KVLayout.of(kv, "tiny")
    listener = socket.create_server(("127.0.0.1", 0))

    def fake_receiver():
        conn, _ = listener.accept()
        with conn:
            recv_frame(conn)
            send_buffers(conn, [encode(FrameType.HELLO_OK, text=hello_text(
                layout, Endpoint("auto", "elsewhere").to_dict(), "nccl"))])
            conn.recv(1)
    thread = threading.Thread(target=fake_receiver, daemon=True)
    thread.start()
    sender = make_sender("auto", layout, timeout_s=10)
    try:
        with pytest.raises(KVHandshakeError, match="the receiver chose transport 'nccl', this side 'tcp'"):
            sender.open("r", f"127.0.0.1:{listener.getsockname()[1]}", kv)
    finally:
        sender.close()
        thread.join(10)
        listener.close()


def test_a_receive_path_the_receiver_cannot_build_is_refused_at_the_handshake(monkeypatch):
    """E.g. a CUDA stream that cannot be created: HELLO_ERR with the reason, not an accepted
    handshake followed by a dropped connection."""
    from services.transport import control_receiver

    def broken(*args):
        raise RuntimeError("no CUDA stream could be created")
    monkeypatch.setattr(control_receiver, "receive_path", broken)
    kv = _kv()
    layout = KVLayout.of(kv, "tiny")
    receiver = make_receiver("auto", layout, kv, timeout_s=10)
    sender = make_sender("auto", layout, timeout_s=10)
    try:
        with pytest.raises(KVHandshakeError, match="the receiver cannot run tcp: no CUDA stream could be created"):
            sender.open("r", receiver.address, kv)
    finally:
        sender.close()
        receiver.close()
