"""KV transfer throughput of the tcp transport beside a plain-socket baseline, in one run.

Two processes, pinned to different cores when there are two: this one sends, a spawned child
receives. Per payload size and repetition, the sender pushes a request's blocks chunk by chunk and
layer group by layer group (as the prefill engine does) and commits; the time from the first push
to the ACK is the KV transfer time. Between the same two processes, the baseline sends the same
number of bytes with ``sendall`` from a preallocated buffer, the child ``recv_into``s a
preallocated buffer and answers one byte. The two alternate (which goes first flips each
repetition) and each reports its median.
The cache layout is the ``small`` model's: 8 layers, 8 KV heads, head_dim 64, block 16, bfloat16.

Prints one JSON object: per size the medians kv_transfer_gbps, plain_socket_gbps and their ratio
(goal >= 0.8), the transport's own window (kv_window_gbps: first byte sent -> ACK) and the best
repetition of each (less sensitive to other load on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from services.transport import KVLayout, make_receiver, make_sender   # noqa: E402
from services.transport.framing import tune                           # noqa: E402

LAYOUT = KVLayout("small", "bfloat16", block_size=16, num_layers=8, num_kv_heads=8, head_dim=64)
BLOCK_BYTES = LAYOUT.num_layers * LAYOUT.bytes_per_block_layer        # one block, all layers


def make_cache(num_blocks: int, random_fill: bool) -> torch.Tensor:
    """kv: [num_blocks, layers, 2, block_size, kv_heads, head_dim] in bfloat16."""
    shape = (num_blocks, LAYOUT.num_layers, 2, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return torch.randn(shape).to(torch.bfloat16) if random_fill else torch.zeros(shape, dtype=torch.bfloat16)


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def receiver_main(control, num_blocks: int, max_bytes: int, cpu: int | None) -> None:
    """Child process: a KVReceiver and a plain-socket sink, driven by messages on ``control``."""
    pin(cpu)
    torch.set_num_threads(1)
    receiver = make_receiver("tcp", LAYOUT, make_cache(num_blocks, random_fill=False))
    listener = socket.create_server(("127.0.0.1", 0))
    control.send((receiver.address, listener.getsockname()[1]))
    plain, _ = listener.accept()
    tune(plain, None)                         # same options as the transport, blocking
    sink = memoryview(bytearray(max_bytes))
    while (message := control.recv()) != "stop":
        kind, arg = message
        if kind == "expect":
            receiver.expect(arg[0], arg[1], lambda rid, num_tokens, meta: None)
            control.send("ready")
        else:                                 # ("plain", nbytes)
            control.send("ready")
            got = 0
            while got < arg:
                got += plain.recv_into(sink[got:arg])
            plain.sendall(b"\x01")
    control.send(receiver.stats())
    plain.close()
    listener.close()
    receiver.close()


def kv_transfer(sender, address: str, kv: torch.Tensor, control, rid: str, src_ids: list[int],
                dst_ids: list[int], blocks_per_chunk: int, layers_per_push: int) -> tuple[float, float]:
    """One transfer; returns (first push -> ACK seconds, the transport's own window_s)."""
    control.send(("expect", (rid, dst_ids)))
    control.recv()
    transfer = sender.open(rid, address, kv)
    t0 = time.perf_counter()
    for first in range(0, len(src_ids), blocks_per_chunk):
        for layer in range(0, LAYOUT.num_layers, layers_per_push):
            transfer.push(src_ids[first:first + blocks_per_chunk], first, layer,
                          min(layer + layers_per_push, LAYOUT.num_layers))
    stats = transfer.commit(len(src_ids) * LAYOUT.block_size, {}, timeout=30)
    return time.perf_counter() - t0, stats.window_s


def plain_transfer(sock: socket.socket, buffer: memoryview, nbytes: int, control) -> float:
    """sendall ``nbytes`` and wait for the one-byte reply; returns seconds."""
    control.send(("plain", nbytes))
    control.recv()
    t0 = time.perf_counter()
    sock.sendall(buffer[:nbytes])
    sock.recv(1)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,4,16,64", help="payload sizes in MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per size (after one warm-up)")
    parser.add_argument("--blocks-per-chunk", type=int, default=32, help="blocks per prefill chunk (512 tokens)")
    parser.add_argument("--layers-per-push", type=int, default=2, help="layers per push (the layer group)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    max_blocks = max(sizes) * (1 << 20) // BLOCK_BYTES
    num_blocks = max_blocks + 16
    cores = sorted(os.sched_getaffinity(0))
    cpus = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)

    ctx = mp.get_context("spawn")
    control, child_end = ctx.Pipe()
    child = ctx.Process(target=receiver_main, args=(child_end, num_blocks, max(sizes) << 20, cpus[1]))
    child.start()
    pin(cpus[0])
    torch.set_num_threads(1)
    kv = make_cache(num_blocks, random_fill=True)
    buffer = memoryview(bytearray(max(sizes) << 20))
    address, plain_port = control.recv()
    sender = make_sender("tcp", LAYOUT)
    plain = socket.create_connection(("127.0.0.1", plain_port))
    tune(plain, None)
    rng = random.Random(0)

    results = []
    for size in sizes:
        blocks = size * (1 << 20) // BLOCK_BYTES
        nbytes = blocks * BLOCK_BYTES
        kv_s, window_s, plain_s = [], [], []
        for rep in range(args.repeats + 1):
            src_ids, dst_ids = rng.sample(range(num_blocks), blocks), rng.sample(range(num_blocks), blocks)
            if rep % 2:                                # alternate which goes first
                base = plain_transfer(plain, buffer, nbytes, control)
            wall, window = kv_transfer(sender, address, kv, control, f"{size}-{rep}", src_ids, dst_ids,
                                       args.blocks_per_chunk, args.layers_per_push)
            if not rep % 2:
                base = plain_transfer(plain, buffer, nbytes, control)
            if rep:                                    # rep 0 warms up both paths
                kv_s.append(wall)
                window_s.append(window)
                plain_s.append(base)
        kv_gbps = nbytes / statistics.median(kv_s) / 1e9
        plain_gbps = nbytes / statistics.median(plain_s) / 1e9
        results.append({"size_mib": size, "bytes": nbytes, "kv_transfer_gbps": round(kv_gbps, 3),
                        "plain_socket_gbps": round(plain_gbps, 3), "ratio": round(kv_gbps / plain_gbps, 3),
                        "kv_window_gbps": round(nbytes / statistics.median(window_s) / 1e9, 3),
                        "kv_best_gbps": round(nbytes / min(kv_s) / 1e9, 3),
                        "plain_best_gbps": round(nbytes / min(plain_s) / 1e9, 3)})

    control.send("stop")
    receiver_stats = control.recv()
    child.join()
    plain.close()
    sender_stats = sender.stats()
    sender.close()
    print(json.dumps({
        "benchmark": "kv_transfer", "transport": "tcp", "layout": LAYOUT.__dict__,
        "pinned_cpus": list(cpus) if cpus[0] is not None else None, "repeats": args.repeats,
        "blocks_per_chunk": args.blocks_per_chunk, "layers_per_push": args.layers_per_push,
        "results": results,
        "check": {"bytes_sent": sender_stats["bytes_sent"], "bytes_received": receiver_stats["bytes_received"],
                  "transfers_committed": receiver_stats["transfers_committed"]},
    }))


if __name__ == "__main__":
    main()
