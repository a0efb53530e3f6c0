"""Paged decode attention: fused CPU kernel vs pure-torch reference (ms per call).

Usage: python benchmarks/bench_attention.py [--batch 64] [--context 384] [--iters 20]
       python benchmarks/bench_attention.py --suite [--iters 50] [--no-reference]
Prints one JSON line per (config, impl, threads) with the median and min over --iters calls.
--suite runs the standard decode configs (see SUITE) instead of the single one given by flags.
The cache is a strided view of a [num_blocks, num_layers, 2, block_size, Hkv, D] tensor, as in
the engine. The machine may be shared: prefer the min, and repeat runs before trusting a median.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.engine import attention_ops  # noqa: E402


def make_inputs(batch, context, heads, kv_heads, head_dim, block_size, num_layers, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = (context + block_size - 1) // block_size
    num_blocks = batch * blocks_per_seq + 8
    cache = torch.randn(num_blocks, num_layers, 2, block_size, kv_heads, head_dim, generator=g).to(dtype)
    k_cache, v_cache = cache[:, 0, 0], cache[:, 0, 1]
    perm = torch.randperm(num_blocks, generator=g)[: batch * blocks_per_seq]
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, block_tables, seq_lens


# Standard configs: (batch, context, heads, kv_heads, dtype, threads).
SUITE = [
    (64, 384, 8, 8, "bfloat16", "1,2"),   # mid batch, the main tuning target
    (256, 96, 8, 8, "bfloat16", "2"),     # large batch, short context
    (4, 2048, 8, 8, "bfloat16", "2"),     # small batch, long context (fewer rows than threads * heads)
    (64, 384, 8, 2, "bfloat16", "2"),     # GQA: 4 query heads per kv head
    (64, 384, 8, 8, "float32", "2"),      # fp32 cache
]


def time_ms(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--suite", action="store_true", help="run the SUITE configs")
    ap.add_argument("--no-reference", action="store_true", help="time only the kernel")
    args = ap.parse_args()
    if args.suite:
        for batch, context, heads, kv_heads, dtype, threads in SUITE:
            run_config(argparse.Namespace(**{**vars(args), "batch": batch, "context": context, "heads": heads,
                                             "kv_heads": kv_heads, "dtype": dtype, "threads": threads}))
    else:
        run_config(args)


def run_config(args):
    dtype = getattr(torch, args.dtype)
    q, kc, vc, bt, sl = make_inputs(args.batch, args.context, args.heads, args.kv_heads, args.head_dim,
                                    args.block_size, args.num_layers, dtype)
    scale = args.head_dim ** -0.5
    mod = attention_ops.load_kernels()
    base = dict(batch=args.batch, context=args.context, heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim, block_size=args.block_size, dtype=args.dtype)
    if mod is not None:
        err = (attention_ops.paged_decode_attention(q, kc, vc, bt, sl, scale).float()
               - attention_ops.paged_decode_attention_reference(q, kc, vc, bt, sl, scale).float()).abs().max()
        base["max_abs_err"] = float(err)
    kv_bytes = 2 * args.batch * args.context * args.kv_heads * args.head_dim * q.element_size()
    old_threads = torch.get_num_threads()
    try:
        for nt in (int(x) for x in args.threads.split(",")):
            torch.set_num_threads(nt)
            impls = {}
            if not args.no_reference:
                impls["reference"] = lambda: attention_ops.paged_decode_attention_reference(q, kc, vc, bt, sl, scale)
            if mod is not None:  # the public entry point (includes output allocation)
                impls["kernel"] = lambda: attention_ops.paged_decode_attention(q, kc, vc, bt, sl, scale)
            res = {}
            for name, fn in impls.items():
                med, best = time_ms(fn, args.iters)
                res[name] = med
                print(json.dumps({**base, "impl": name, "threads": nt, "ms_median": round(med, 3),
                                  "ms_min": round(best, 3), "kv_GBps": round(kv_bytes / med / 1e6, 1),
                                  "kv_GBps_best": round(kv_bytes / best / 1e6, 1)}))
            if "kernel" in res and "reference" in res:
                print(json.dumps({**base, "threads": nt, "speedup": round(res["reference"] / res["kernel"], 1)}))
    finally:
        torch.set_num_threads(old_threads)


if __name__ == "__main__":
    main()
