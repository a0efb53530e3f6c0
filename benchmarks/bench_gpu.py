"""GPU benchmarks of `small` (bfloat16), printed as JSON lines, each compared inside the same run:

1. `kv_transfer`: KV transfer throughput for 1, 4, 16, 64 and 256 MiB beside a plain
   device-to-device copy (`dst.copy_(src)`) of the same bytes between the same devices, and their
   ratio (goal >= 0.8). With two GPUs: the `nccl` transport between two processes (cuda:0 →
   cuda:1). With one: `NcclLink` self send/recv inside one group (gather → send/recv → scatter,
   in-process) and the `cuda_ipc` transport between two processes on the GPU. A transfer is timed
   from its first push to its ACK (link: from the group's start to its completion), pushing layer
   groups of block chunks as the prefill engine does, between random block ids.
2. `engine_decode`: decode throughput of the engine at batch 1, 16 and 64: decode tokens per
   second over steps that ran only decodes (prompt 128 tokens, 128 output tokens each).
3. `ttft_breakdown`: one request at a time on a 1P+1D cluster (nccl across two GPUs, else
   cuda_ipc on one): queue / prefill / transfer / first decode step, median of --repeats.

Without a CUDA GPU it prints one line {"skipped": "no CUDA GPU: ..."} and exits 0. A section that
fails prints {"bench": ..., "error": ...} and the script exits 1 after the others ran.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES_MIB = "1,4,16,64,256"


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def gpu_skip_reason() -> str | None:
    try:
        import torch
    except ImportError as e:
        return f"no CUDA GPU: torch is not importable ({e})"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    return None


def nccl_skip_reason() -> str | None:
    from services.transport.selection import nccl_problem      # imports CuPy: only once a GPU was seen
    return nccl_problem()


# ---- 1. KV transfer --------------------------------------------------------------------------------
def layout():
    from services.transport import KVLayout
    return KVLayout("small", "bfloat16", block_size=16, num_layers=8, num_kv_heads=8, head_dim=64)


def make_cache(num_blocks: int, device: str, random_fill: bool):
    """kv: [num_blocks, layers, 2, block_size, kv_heads, head_dim] in bfloat16 on `device`."""
    import torch
    lo = layout()
    shape = (num_blocks, lo.num_layers, 2, lo.block_size, lo.num_kv_heads, lo.head_dim)
    if random_fill:
        return torch.randn(shape, device=device).to(torch.bfloat16)
    return torch.zeros(shape, dtype=torch.bfloat16, device=device)


def receiver_main(control, setting: str, device: str, num_blocks: int) -> None:
    """Child process: a KV receiver of `setting` writing into a cache on `device`."""
    import torch
    from services.transport import make_receiver

    torch.cuda.set_device(torch.device(device))
    receiver = make_receiver(setting, layout(), make_cache(num_blocks, device, random_fill=False), timeout_s=120)
    control.send(receiver.address)
    while (message := control.recv()) != "stop":
        rid, dst_ids = message
        receiver.expect(rid, dst_ids, lambda r, n, meta: None)
        control.send("ready")
    control.send(receiver.stats())
    receiver.close()


def timed_copy(dst, src) -> float:
    """Seconds for dst.copy_(src), host-timed between two device synchronisations."""
    import torch
    torch.cuda.synchronize(src.device)
    torch.cuda.synchronize(dst.device)
    t0 = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize(dst.device)
    torch.cuda.synchronize(src.device)
    return time.perf_counter() - t0


def pushes(src_ids: list[int], blocks_per_chunk: int, layers_per_push: int, num_layers: int):
    """(ids, first_index, layer_start, layer_end) in prefill order: chunk by chunk, layer group by group."""
    for first in range(0, len(src_ids), blocks_per_chunk):
        for layer in range(0, num_layers, layers_per_push):
            yield src_ids[first:first + blocks_per_chunk], first, layer, min(layer + layers_per_push, num_layers)


def transport_transfer(sender, address: str, kv, control, rid: str, src_ids, dst_ids, args) -> float:
    """One transfer through the transport; first push → ACK seconds."""
    control.send((rid, dst_ids))
    control.recv()
    transfer = sender.open(rid, address, kv)
    t0 = time.perf_counter()
    for ids, first, l0, l1 in pushes(src_ids, args.blocks_per_chunk, args.layers_per_push, layout().num_layers):
        transfer.push(ids, first, l0, l1)
    transfer.commit(len(src_ids) * layout().block_size, {}, timeout=120)
    return time.perf_counter() - t0


def bench_transport(setting: str, src_device: str, dst_device: str, sizes: list[int], args) -> dict:
    """`setting` between this process (sender, src_device) and a child (receiver, dst_device)."""
    import torch
    from services.transport import make_sender

    lo = layout()
    block_bytes = lo.num_layers * lo.bytes_per_block_layer
    num_blocks = max(sizes) * (1 << 20) // block_bytes + 16
    ctx = mp.get_context("spawn")
    control, child_end = ctx.Pipe()
    child = ctx.Process(target=receiver_main, args=(child_end, setting, dst_device, num_blocks))
    child.start()
    try:
        torch.cuda.set_device(torch.device(src_device))
        kv = make_cache(num_blocks, src_device, random_fill=True)
        address = control.recv()
        sender = make_sender(setting, lo, timeout_s=120)
        rng = random.Random(0)
        results = []
        for size in sizes:
            blocks = size * (1 << 20) // block_bytes
            nbytes = blocks * block_bytes
            src = torch.empty(nbytes, dtype=torch.uint8, device=src_device)
            dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device)
            kv_s, copy_s = [], []
            for rep in range(args.repeats + 1):
                src_ids, dst_ids = rng.sample(range(num_blocks), blocks), rng.sample(range(num_blocks), blocks)
                first_copy = rep % 2 == 1                      # alternate which goes first
                if first_copy:
                    base = timed_copy(dst, src)
                wall = transport_transfer(sender, address, kv, control, f"{setting}-{size}-{rep}", src_ids,
                                          dst_ids, args)
                if not first_copy:
                    base = timed_copy(dst, src)
                if rep:                                        # rep 0 warms both paths up
                    kv_s.append(wall)
                    copy_s.append(base)
            results.append(size_row(size, nbytes, kv_s, copy_s))
            del src, dst
        control.send("stop")
        receiver_stats = control.recv()
        sender_stats = sender.stats()
        sender.close()
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
    return {"bench": "kv_transfer", "transport": setting, "from": src_device, "to": dst_device,
            "layout": lo.__dict__, "repeats": args.repeats, "blocks_per_chunk": args.blocks_per_chunk,
            "layers_per_push": args.layers_per_push, "results": results,
            "check": {"bytes_sent": sender_stats.get("bytes_sent"),
                      "bytes_received": receiver_stats.get("bytes_received"),
                      "transfers_committed": receiver_stats.get("transfers_committed")}}


def size_row(size: int, nbytes: int, kv_s: list[float], copy_s: list[float]) -> dict:
    kv_gbps = nbytes / statistics.median(kv_s) / 1e9
    copy_gbps = nbytes / statistics.median(copy_s) / 1e9
    return {"size_mib": size, "bytes": nbytes, "kv_transfer_gbps": round(kv_gbps, 2),
            "plain_copy_gbps": round(copy_gbps, 2), "ratio": round(kv_gbps / copy_gbps, 3), "goal": 0.8,
            "kv_best_gbps": round(nbytes / min(kv_s) / 1e9, 2), "copy_best_gbps": round(nbytes / min(copy_s) / 1e9, 2)}


def bench_nccl_self(sizes: list[int], args) -> dict:
    """NcclLink self send/recv on cuda:0 inside one group, beside dst.copy_(src) on the same GPU."""
    import torch
    from services.transport.nccl_link import NcclLink

    lo = layout()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    block_bytes = lo.num_layers * lo.bytes_per_block_layer
    num_blocks = max(sizes) * (1 << 20) // block_bytes + 16
    src_kv, dst_kv = make_cache(num_blocks, "cuda:0", True), make_cache(num_blocks, "cuda:0", False)
    link = NcclLink(NcclLink.new_unique_id(), 1, 0, device)
    rng = random.Random(1)
    results = []
    try:
        for size in sizes:
            blocks = size * (1 << 20) // block_bytes
            nbytes = blocks * block_bytes
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
            kv_s, copy_s = [], []
            for rep in range(args.repeats + 1):
                src_ids, dst_ids = rng.sample(range(num_blocks), blocks), rng.sample(range(num_blocks), blocks)
                if rep % 2:
                    base = timed_copy(dst, src)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for first in range(0, blocks, args.blocks_per_chunk):
                    for layer in range(0, lo.num_layers, args.layers_per_push):
                        l1 = min(layer + args.layers_per_push, lo.num_layers)
                        with link.group():
                            link.send_blocks(src_kv, src_ids[first:first + args.blocks_per_chunk], layer, l1, peer=0)
                            link.recv_blocks(dst_kv, dst_ids[first:first + args.blocks_per_chunk], layer, l1, peer=0)
                link.synchronize(timeout_s=120)
                wall = time.perf_counter() - t0
                if not rep % 2:
                    base = timed_copy(dst, src)
                if rep:
                    kv_s.append(wall)
                    copy_s.append(base)
            results.append(size_row(size, nbytes, kv_s, copy_s))
            del src, dst
    finally:
        link.close()
    ok = all(torch.equal(dst_kv[d], src_kv[s]) for s, d in zip(src_ids[:8], dst_ids[:8]))
    return {"bench": "kv_transfer", "transport": "nccl_link_self", "from": "cuda:0", "to": "cuda:0",
            "layout": lo.__dict__, "repeats": args.repeats, "blocks_per_chunk": args.blocks_per_chunk,
            "layers_per_push": args.layers_per_push, "results": results, "check": {"last_blocks_equal": ok}}


def section_transfer(args) -> list[dict]:
    import torch
    sizes = [int(s) for s in args.sizes.split(",")]
    nccl = nccl_skip_reason()
    out = []
    if torch.cuda.device_count() >= 2:
        if nccl:
            out.append({"bench": "kv_transfer", "transport": "nccl", "skipped": nccl})
            out.append(bench_transport("tcp", "cuda:0", "cuda:1", sizes, args))
        else:
            out.append(bench_transport("nccl", "cuda:0", "cuda:1", sizes, args))
    else:
        out.append({"bench": "kv_transfer", "transport": "nccl_link_self", "skipped": nccl} if nccl
                   else bench_nccl_self(sizes, args))
        out.append(bench_transport("cuda_ipc", "cuda:0", "cuda:0", sizes, args))
    return out


# ---- 2. engine decode ------------------------------------------------------------------------------
def section_engine(args) -> list[dict]:
    from services.engine.builder import build_engine
    from services.engine.sampling_params import SamplingParams

    batches = [int(b) for b in args.batches.split(",")]
    prompt_len, out_len = 128, 128
    per_request = -(-(prompt_len + out_len) // 16)
    engine = build_engine("small", dtype="bfloat16", device="cuda", num_blocks=max(batches) * per_request + 64,
                          max_num_batched_tokens=8192, max_num_seqs=max(batches), enable_prefix_caching=False)
    vocab = engine.config.model.vocab_size
    rng = random.Random(0)
    params = SamplingParams(max_tokens=out_len, ignore_eos=True, detokenize=False)
    engine.generate([[rng.randrange(10, vocab) for _ in range(64)] for _ in range(4)],
                    SamplingParams(max_tokens=8, ignore_eos=True))                     # warm-up
    rows = []
    for batch in batches:
        for _ in range(batch):
            engine.add_request([rng.randrange(10, vocab) for _ in range(prompt_len)], params)
        decode_s, decode_tokens, step_ms = 0.0, 0, []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()                           # ends with the sampler's tokens on the host
            dt = time.perf_counter() - t0
            if engine.last_step_prefill_tokens == 0 and engine.last_step_decodes:
                decode_s += dt
                decode_tokens += engine.last_step_decodes
                step_ms.append(dt * 1e3)
        engine.check_integrity()
        p50 = statistics.median(step_ms)
        rows.append({"batch": batch, "decode_tokens_per_s": round(decode_tokens / decode_s, 1),
                     "decode_tokens_per_s_at_p50_step": round(batch / p50 * 1e3, 1), "step_ms_p50": round(p50, 3),
                     "decode_steps": len(step_ms)})
    import torch
    return [{"bench": "engine_decode", "model": "small", "dtype": "bfloat16", "device": torch.cuda.get_device_name(0),
             "prompt_tokens": prompt_len, "output_tokens": out_len, "results": rows}]


# ---- 3. TTFT breakdown ---------------------------------------------------------------------------------
def section_ttft(args) -> list[dict]:
    import torch
    from services.engine.builder import load_tokenizer
    from services.engine.loader import export_model, resolve_model
    from tandem import Client
    from tandem.local_cluster import LocalCluster

    loaded = resolve_model("small")
    model_dir = os.path.join(tempfile.mkdtemp(prefix="tandem-bench-gpu-"), "small")
    export_model(loaded, model_dir, load_tokenizer(loaded))
    base = ["--dtype", "bfloat16", "--num-blocks", "2048", "--max-num-batched-tokens", "2048"]
    if torch.cuda.device_count() >= 2:
        transport = "tcp" if nccl_skip_reason() else "nccl"
        role_args = {"prefill": ["--device", "cuda:0"], "decode": ["--device", "cuda:1"]}
    else:
        transport, role_args = "cuda_ipc", {"prefill": ["--device", "cuda:0"], "decode": ["--device", "cuda:0"]}
    vocab = loaded.config.vocab_size
    rng = random.Random(7)
    rows = []
    with LocalCluster(model_dir, prefill=1, decode=1, worker_args=base + ["--kv-transport", transport],
                      role_args=role_args) as c, Client(c.address) as client:
        for k in range(args.repeats + 2):
            prompt = [rng.randrange(10, vocab - 1) for _ in range(args.ttft_prompt)]
            r = client.complete(token_ids=prompt, max_tokens=4, ignore_eos=True)
            if k >= 2:                                   # two warm-ups
                rows.append({"client_ttft_s": r.ttft_s, **r.ttft_breakdown})
    keys = ["client_ttft_s", "queue_s", "prefill_s", "transfer_s", "first_decode_s", "kv_bytes"]
    medians = {k: statistics.median(float(row.get(k, 0.0)) for row in rows) for k in keys}
    return [{"bench": "ttft_breakdown", "cluster": "1P+1D", "transport": transport, "prompt_tokens": args.ttft_prompt,
             "devices": [role_args["prefill"][1], role_args["decode"][1]], **medians}]


SECTIONS = {"transfer": section_transfer, "engine": section_engine, "ttft": section_ttft}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="transfer,engine,ttft", help="comma-separated: transfer, engine, ttft")
    ap.add_argument("--sizes", default=SIZES_MIB, help="KV transfer sizes in MiB")
    ap.add_argument("--repeats", type=int, default=9, help="timed repetitions (after one warm-up)")
    ap.add_argument("--blocks-per-chunk", type=int, default=32, help="blocks per prefill chunk (512 tokens)")
    ap.add_argument("--layers-per-push", type=int, default=2, help="layers per push (the layer group)")
    ap.add_argument("--batches", default="1,16,64", help="engine decode batch sizes")
    ap.add_argument("--ttft-prompt", type=int, default=512)
    args = ap.parse_args()
    reason = gpu_skip_reason()
    if reason is not None:
        emit({"skipped": reason})
        return 0
    failed = False
    for name in args.sections.split(","):
        try:
            for row in SECTIONS[name](args):
                emit(row)
        except Exception as e:                       # report, run the other sections, exit 1 at the end
            failed = True
            emit({"bench": name, "error": f"{type(e).__name__}: {e}",
                  "where": traceback.format_exc().strip().splitlines()[-3:]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
