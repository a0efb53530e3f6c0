"""Paged decode attention: fused CPU kernel variants vs pure-torch reference (ms per call, effective GB/s).

Usage: python benchmarks/bench_attention.py [--batch 8] [--context 512] [--heads 8 --kv-heads 8 --head-dim 64]
       python benchmarks/bench_attention.py --suite [--iters 20] [--no-reference]
       python benchmarks/bench_attention.py --variant avx2,scalar     (default: every variant this CPU runs)
       python benchmarks/bench_attention.py --suite --baseline HEAD~3  (the kernel at a git revision, same process)
Prints one JSON line per (config, impl, threads): ms per call (median and min over --iters) and the
effective bandwidth, GBps = the K and V bytes the call must read (2 * sum(seq_lens) * Hkv * D * dtype
size) / time; kernel lines carry "simd" (the variant) and the speedup over the reference (or over the
baseline's same variant with --baseline). Starts with a {"host": ...} line (CPU model, cores, flags).

As in the engine, the cache is one [num_blocks, num_layers, 2, block_size, Hkv, D] tensor (default 8
layers, block tables shuffled) and each timed call reads the next layer's K/V views, so a call streams
its KV from memory the way a decode step's layers do, not from a cache-warm copy (at the suite's shapes
8 layers are 64-512 MB; --layers 1 times the cache-warm case). The machine may be shared: prefer the
min, and compare variants / revisions within one run (impls are timed interleaved, round by round).
--variant default times the variant the engine would load (attention_ops.load_kernels()).
--suite runs the standard decode configs (SUITE) instead of the single one given by flags.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from services.engine import attention_ops, dtype_policy  # noqa: E402


def make_inputs(batch, context, heads, kv_heads, head_dim, block_size, num_layers, dtype, seed=0):
    """q, the engine-layout cache, block tables (shuffled blocks), seq_lens."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = (context + block_size - 1) // block_size
    num_blocks = batch * blocks_per_seq + 8
    cache = torch.empty(num_blocks, num_layers, 2, block_size, kv_heads, head_dim, dtype=dtype)
    for layer in range(num_layers):  # in slices: a float32 randn of the whole cache would double the peak
        cache[:, layer] = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[: batch * blocks_per_seq]
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    return q, cache, block_tables, seq_lens


# Standard configs: (batch, context, heads, kv_heads, head_dim, dtype, threads).
SUITE = [
    (8, 512, 8, 8, 64, "bfloat16", "1,2"),     # serving batch, no GQA (model `small`): one 64-dim dot per K row
    (32, 512, 8, 8, 64, "bfloat16", "1,2"),
    (8, 512, 32, 8, 128, "bfloat16", "1,2"),   # GQA, 4 query heads per kv head (Llama-8B-like heads)
    (32, 512, 32, 8, 128, "bfloat16", "1,2"),
    (8, 512, 8, 8, 64, "float32", "1,2"),
    (8, 512, 32, 8, 128, "float32", "1,2"),
    (1, 4096, 32, 8, 128, "bfloat16", "1,2"),  # batch 1, long context: partitions feed both threads
]


def host_line() -> dict:
    flags = dtype_policy.cpu_flags()
    name = dtype_policy.detect_capabilities("cpu").name
    return {"host": {"cpu": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8, help="cache layers cycled through, one per call (1: cache-warm)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=20, help="timed rounds; each round times every impl once")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--suite", action="store_true", help="run the SUITE configs")
    ap.add_argument("--no-reference", action="store_true", help="time only the kernel")
    ap.add_argument("--variant", default="all",
                    help="kernel variants to time: 'all' (every one this CPU runs), 'default', or a comma list")
    ap.add_argument("--baseline", metavar="REV",
                    help="also time the kernel sources of this git revision (same variants), built beside")
    args = ap.parse_args()
    print(json.dumps(host_line()), flush=True)
    mods = kernel_variants(args.variant)
    base = baseline_variants(args.baseline, list(mods)) if args.baseline else {}
    if args.suite:
        for batch, context, heads, kv_heads, head_dim, dtype, threads in SUITE:
            run_config(argparse.Namespace(**{**vars(args), "batch": batch, "context": context, "heads": heads,
                                             "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype,
                                             "threads": threads}), mods, base)
    else:
        run_config(args, mods, base)


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


def baseline_variants(rev: str, names: list[str]) -> dict[str, object]:
    """{simd name: module} built from the kernel sources at git revision `rev` (module names get a
    revision suffix, so both load into this process)."""
    from torch.utils.cpp_extension import load

    sha = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", rev], text=True).strip()
    csrc = attention_ops._SOURCES[0].parent.relative_to(ROOT)
    src_dir = Path(tempfile.mkdtemp(prefix=f"tandem-kernels-{sha}-"))
    files = subprocess.check_output(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{sha}:{csrc}"], text=True).split()
    for f in files:
        (src_dir / f).write_bytes(subprocess.check_output(["git", "-C", str(ROOT), "show", f"{sha}:{csrc}/{f}"]))
    sources = [str(src_dir / s.name) for s in attention_ops._SOURCES if (src_dir / s.name).exists()]
    attention_ops._ensure_ninja_on_path()
    mods = {}
    for name in names:
        v = attention_ops._BY_NAME[name]
        build_dir = attention_ops.kernel_build_dir(name).parent / f"baseline-{sha}" / name
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            mods[name] = load(name=f"{attention_ops._EXT_NAME}_{name}_{sha}", sources=sources,
                              extra_cflags=[*attention_ops._CFLAGS, *v.cflags], extra_ldflags=attention_ops._LDFLAGS,
                              build_directory=str(build_dir), verbose=False)
        except Exception as e:  # noqa: BLE001 - reported, the run goes on without it
            print(json.dumps({"simd": name, "baseline": sha, "error": attention_ops._error_summary(e)}))
    for mod in mods.values():
        mod.revision = sha
    return mods


def run_config(args, mods, base):
    dtype = getattr(torch, args.dtype)
    q, cache, bt, sl = make_inputs(args.batch, args.context, args.heads, args.kv_heads, args.head_dim,
                                   args.block_size, args.layers, dtype)
    views = [(cache[:, layer, 0], cache[:, layer, 1]) for layer in range(args.layers)]
    scale = args.head_dim ** -0.5
    config = dict(batch=args.batch, context=args.context, heads=args.heads, kv_heads=args.kv_heads,
                  head_dim=args.head_dim, block_size=args.block_size, dtype=args.dtype, layers=args.layers)
    ref_out = attention_ops.paged_decode_attention_reference(q, *views[0], bt, sl, scale).float()

    def kernel_fn(mod):  # what paged_decode_attention does on the CPU, output allocation included
        def call(kc, vc):
            o = torch.empty_like(q)
            mod.paged_decode_attention(o, q, kc, vc, bt, sl, scale)
            return o
        return call

    impls = {}  # label -> (fn(kc, vc), extra fields)
    if not args.no_reference:
        impls["reference"] = (lambda kc, vc: attention_ops.paged_decode_attention_reference(q, kc, vc, bt, sl, scale), {})
    for label, group in (("kernel", mods), ("baseline", base)):
        for name, mod in group.items():
            fn = kernel_fn(mod)
            extra = {"simd": name, "max_abs_err": float((fn(*views[0]).float() - ref_out).abs().max())}
            if label == "baseline":
                extra["revision"] = mod.revision
            impls[f"{label}:{name}"] = (fn, extra)
    kv_bytes = 2 * int(sl.sum()) * args.kv_heads * args.head_dim * q.element_size()
    old_threads = torch.get_num_threads()
    try:
        for nt in (int(x) for x in args.threads.split(",")):
            torch.set_num_threads(nt)
            times = {name: [] for name in impls}
            layer = 0
            for name, (fn, _) in impls.items():  # warm-up: builds, page faults, thread pool
                for kc, vc in views[:3]:
                    fn(kc, vc)
            for _ in range(args.iters):  # interleaved: a burst of load on the shared machine hits every impl
                for name, (fn, _) in impls.items():
                    kc, vc = views[layer % len(views)]
                    layer += 1
                    t0 = time.perf_counter()
                    fn(kc, vc)
                    times[name].append((time.perf_counter() - t0) * 1e3)
            ms = {name: (sorted(t)[len(t) // 2], min(t)) for name, t in times.items()}
            for name, (fn, extra) in impls.items():
                med, best = ms[name]
                line = {**config, "impl": name.split(":")[0], **extra, "threads": nt, "ms_median": round(med, 3),
                        "ms_min": round(best, 3), "GBps": round(kv_bytes / med / 1e6, 1),
                        "GBps_best": round(kv_bytes / best / 1e6, 1)}
                if name.startswith("kernel:") and f"baseline:{extra['simd']}" in ms:
                    line["speedup_vs_baseline"] = round(ms[f"baseline:{extra['simd']}"][0] / med, 2)
                elif name != "reference" and "reference" in ms:
                    line["speedup"] = round(ms["reference"][0] / med, 1)
                print(json.dumps(line), flush=True)
    finally:
        torch.set_num_threads(old_threads)


if __name__ == "__main__":
    main()
