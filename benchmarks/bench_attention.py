"""Paged decode attention: fused CPU kernel variants vs pure-torch reference (ms per call).

Usage: python benchmarks/bench_attention.py [--batch 64] [--context 384] [--iters 20]
       python benchmarks/bench_attention.py --suite [--iters 50] [--no-reference]
       python benchmarks/bench_attention.py --variant avx2,scalar     (default: every variant this CPU runs)
Prints one JSON line per (config, impl, threads) with the median and min over --iters calls; kernel
lines carry "simd" (the variant: avx512_bf16, avx512, avx2, scalar) and the speedup over the reference.
--variant default times the variant the engine would load (attention_ops.load_kernels()).
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
    ap.add_argument("--variant", default="all",
                    help="kernel variants to time: 'all' (every one this CPU runs), 'default', or a comma list")
    args = ap.parse_args()
    if args.suite:
        for batch, context, heads, kv_heads, dtype, threads in SUITE:
            run_config(argparse.Namespace(**{**vars(args), "batch": batch, "context": context, "heads": heads,
                                             "kv_heads": kv_heads, "dtype": dtype, "threads": threads}))
    else:
        run_config(args)


def kernel_variants(spec: str) -> dict[str, object]:
    """{simd name: module} for --variant; a variant that fails to build is reported and left out."""
    if spec == "default":
        mod = attention_ops.load_kernels()
        return {mod.simd: mod} if mod is not None else {}
    names = attention_ops.available_variants() if spec == "all" else spec.split(",")
    mods = {}
    for name in names:
        try:
            mod = attention_ops.load_kernels(name)
        except ValueError as e:  # unknown, or this CPU cannot run it
            print(json.dumps({"simd": name, "error": str(e)}))
            continue
        if mod is None:
            print(json.dumps({"simd": name, "error": attention_ops._loader.error(name) or "kernels disabled"}))
        else:
            mods[name] = mod
    return mods


def run_config(args):
    dtype = getattr(torch, args.dtype)
    q, kc, vc, bt, sl = make_inputs(args.batch, args.context, args.heads, args.kv_heads, args.head_dim,
                                    args.block_size, args.num_layers, dtype)
    scale = args.head_dim ** -0.5
    base = dict(batch=args.batch, context=args.context, heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim, block_size=args.block_size, dtype=args.dtype)
    ref_out = attention_ops.paged_decode_attention_reference(q, kc, vc, bt, sl, scale).float()

    def kernel_fn(mod):  # what paged_decode_attention does on the CPU, output allocation included
        def call():
            out = torch.empty_like(q)
            mod.paged_decode_attention(out, q, kc, vc, bt, sl, scale)
            return out
        return call

    impls = {} if args.no_reference else {
        "reference": (lambda: attention_ops.paged_decode_attention_reference(q, kc, vc, bt, sl, scale), {})}
    for name, mod in kernel_variants(args.variant).items():
        err = float((kernel_fn(mod)().float() - ref_out).abs().max())
        impls[f"kernel:{name}"] = (kernel_fn(mod), {"simd": name, "max_abs_err": err})
    kv_bytes = 2 * args.batch * args.context * args.kv_heads * args.head_dim * q.element_size()
    old_threads = torch.get_num_threads()
    try:
        for nt in (int(x) for x in args.threads.split(",")):
            torch.set_num_threads(nt)
            ref_ms = None
            for name, (fn, extra) in impls.items():
                med, best = time_ms(fn, args.iters)
                line = {**base, "impl": name.split(":")[0], **extra, "threads": nt, "ms_median": round(med, 3),
                        "ms_min": round(best, 3), "kv_GBps": round(kv_bytes / med / 1e6, 1),
                        "kv_GBps_best": round(kv_bytes / best / 1e6, 1)}
                if name == "reference":
                    ref_ms = med
                elif ref_ms is not None:
                    line["speedup"] = round(ref_ms / med, 1)
                print(json.dumps(line), flush=True)
    finally:
        torch.set_num_threads(old_threads)


if __name__ == "__main__":
    main()
