"""Paged decode attention: the fused CPU kernel, a gathered SDPA path for CUDA, and the reference.

Which one runs is keyed on the query's device type (`decode_attention_backend`): CPU tensors go to
the C++ kernel (bfloat16/float32) or the reference; tensors on any other device (CUDA) go to
`paged_decode_attention_gathered`, plain torch ops that never synchronise with the host. The C++
kernel never sees a CUDA tensor, and there is no CUDA build step.

The kernel (csrc/paged_attention.cpp) is JIT-built with torch.utils.cpp_extension on first use
and cached on disk. Measured first build on the 2-core Zen 5 dev box (gcc 12, ninja): ~22 s,
almost all of it parsing torch/extension.h; later processes load the cached .so in ~0.1 s
(torch only rebuilds when the source or flags change). torch's JIT loader requires the `ninja`
executable: the `ninja` pip package provides one and is put on PATH here if it isn't already.

Env:
  TANDEM_DISABLE_KERNELS=1   never build/load the kernel; always use the reference path.
  TANDEM_KERNEL_CACHE=DIR    build directory (default ~/.cache/tandem/kernels/<torch version>/<cpu tag>-<checkout>;
                             the CPU tag keeps -march=native builds from being shared across CPU types,
                             the checkout tag keeps two checkouts from rebuilding each other's module).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_EXT_NAME = "tandem_cpu_kernels"
_SOURCES = [Path(__file__).resolve().parent / "csrc" / "paged_attention.cpp"]
# -fopenmp is required: at::parallel_for is a header template that only runs in parallel when the
# extension itself is compiled with OpenMP (it then shares torch's bundled libgomp.so.1 thread pool).
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False  # build failed once: don't retry (and don't warn again) in this process


def _cpu_tag() -> str:
    """Short fingerprint of the host CPU's ISA flags (a -march=native build is only valid there)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def kernel_build_dir() -> Path:
    env = os.environ.get("TANDEM_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    # The checkout's path is part of the key: torch's build.ninja names its sources by absolute
    # path, so two checkouts sharing one directory would rebuild each other's module every load.
    here = hashlib.sha1(str(_SOURCES[0].parent).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "tandem" / "kernels" / torch.__version__ / f"{_cpu_tag()}-{here}"


def _kernels_disabled() -> bool:
    return os.environ.get("TANDEM_DISABLE_KERNELS", "").strip().lower() in ("1", "true", "yes", "on")


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return  # torch raises a clear error, which we turn into the fallback warning
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load_kernels() -> ModuleType | None:
    """Build (first time) and load the CPU kernel module; None if disabled or the build fails."""
    global _module, _failed
    if _kernels_disabled():
        return None
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is not None or _failed:
            return _module
        try:
            from torch.utils.cpp_extension import load

            _ensure_ninja_on_path()
            build_dir = kernel_build_dir()
            build_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            _module = load(
                name=_EXT_NAME,
                sources=[str(s) for s in _SOURCES],
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                build_directory=str(build_dir),
                verbose=False,
            )
            log.info("loaded %s (%s) from %s in %.1fs", _EXT_NAME, getattr(_module, "simd", "?"),
                     build_dir, time.perf_counter() - t0)
        except Exception as e:  # no compiler, no ninja, compile error, ...
            _failed = True
            log.warning("CPU attention kernels unavailable, using the pure-torch path: %s", e)
            return None
        return _module


def decode_attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which decode-attention path serves tensors of `device` and `dtype` (no kernel is loaded):

    "cpu_kernel" (CPU, bfloat16/float32: the C++ kernel when it builds, else the reference),
    "reference" (CPU, other dtypes) or "gathered_sdpa" (any other device: CUDA).
    """
    if device.type != "cpu":
        return "gathered_sdpa"
    return "cpu_kernel" if dtype in (torch.bfloat16, torch.float32) else "reference"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
) -> torch.Tensor:
    """Decode attention of one query token per row over its paged K/V.

    q: [B, H, D]; k_cache/v_cache: [num_blocks, block_size, Hkv, D] (dim 0 may be strided, dims 1..3
    contiguous); block_tables: int [B, max_blocks]; seq_lens: int [B] (tokens incl. the current one).
    max_len: max(seq_lens) as a host int; required off the CPU (reading it from the device would
    synchronise every layer), ignored on the CPU. Returns [B, H, D] in q's dtype.
    """
    backend = decode_attention_backend(q.device, q.dtype)
    if backend == "gathered_sdpa":
        if max_len is None:
            raise ValueError("paged_decode_attention on a non-CPU device needs max_len (a host int)")
        return paged_decode_attention_gathered(q, k_cache, v_cache, block_tables, seq_lens, scale, max_len)
    mod = None
    if backend == "cpu_kernel" and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype:
        mod = load_kernels()
    if mod is None:
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
    q = q.contiguous()
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    if block_tables.dim() == 2 and block_tables.size(1) > 1 and block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    if seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        seq_lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    mod.paged_decode_attention(out, q, k_cache, v_cache, block_tables, seq_lens, float(scale))
    return out


def paged_decode_attention_gathered(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_len: int,
) -> torch.Tensor:
    """Device-agnostic paged decode attention without host syncs (the CUDA path).

    Gathers each row's first ceil(max_len / block_size) blocks into a padded [B, Hkv, L, D] copy in
    the cache dtype and runs SDPA with a key-padding mask; the G = H / Hkv query heads that share a
    KV head are SDPA's G query positions (GQA without repeating K/V).

    Preconditions (the runner guarantees them): every entry of block_tables[:, :ceil(max_len /
    block_size)] is a valid block index (padding may point at any block, it is masked), every
    seq_len is in [1, max_len], and cache slots hold finite values (a masked NaN would still leak
    through SDPA's P @ V; the reference path tolerates garbage, this one does not).
    Shapes as paged_decode_attention; block_tables/seq_lens on q's device, any integer dtype.
    """
    B, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = H // Hkv
    nblk = -(-max_len // bs)
    flat = block_tables[:, :nblk].reshape(-1).long()                                  # [B * nblk]

    def gather(cache: torch.Tensor) -> torch.Tensor:                                  # -> [B, Hkv, L, D]
        return cache.index_select(0, flat).view(B, nblk * bs, Hkv, D)[:, :max_len].transpose(1, 2)

    k, v = gather(k_cache), gather(v_cache)
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens.long()[:, None]   # [B, L]
    qg = q.reshape(B, Hkv, G, D)                                                       # [B, Hkv, G, D]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(B, H, D)                                                       # [B, H, D]


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Pure-torch paged decode attention: gather blocks, masked float32 softmax. Fallback and test oracle.

    Block-table entries past a row's needed count and cache slots past its seq_len are ignored even if
    they hold garbage (NaN/inf). Rows with seq_len 0 produce zeros.
    """
    B, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = H // Hkv
    lens = seq_lens.to(device=q.device, dtype=torch.long)
    max_len = int(lens.max()) if B > 0 else 0
    if max_len == 0:
        return torch.zeros_like(q)
    nblk = (max_len + bs - 1) // bs
    needed = (lens + bs - 1) // bs
    ids = block_tables[:, :nblk].to(device=q.device, dtype=torch.long)
    ids = torch.where(torch.arange(nblk, device=q.device)[None, :] < needed[:, None], ids, 0)  # padding -> 0
    flat = ids.reshape(-1)
    valid = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [B, L]

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> float32 [B, Hkv, L, D]
        x = cache.index_select(0, flat).view(B, nblk * bs, Hkv, D)[:, :max_len]
        x = x.masked_fill(~valid[:, :, None, None], 0)  # slots past seq_len may hold garbage (NaN * 0 = NaN)
        return torch.empty(B, Hkv, max_len, D, dtype=torch.float32, device=q.device).copy_(x.transpose(1, 2))

    k, v = gather(k_cache), gather(v_cache)
    # GQA: query heads kvh*G .. kvh*G+G-1 share kv head kvh; viewing q as [B, Hkv, G, D] is the same as
    # repeat_interleave-ing K/V G times along the head dim, without the copy.
    qf = q.float().reshape(B, Hkv, G, D)
    scores = torch.matmul(qf, k.transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill((lens == 0)[:, None, None, None], 0.0)  # all -inf rows -> NaN -> 0
    out = torch.matmul(probs, v)  # [B, Hkv, G, D]
    return out.reshape(B, H, D).to(q.dtype)
