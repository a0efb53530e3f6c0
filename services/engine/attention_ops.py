"""Paged decode attention: the fused CPU kernel, a gathered SDPA path for CUDA, and the reference.

Which one runs is keyed on the query's device type (`decode_attention_backend`): CPU tensors go to
the C++ kernel (bfloat16/float32) or the reference; tensors on any other device (CUDA) go to
`paged_decode_attention_gathered`, plain torch ops that never synchronise with the host. The C++
kernel never sees a CUDA tensor, and there is no CUDA build step.

The kernel (csrc/paged_attention.cpp) is JIT-built with torch.utils.cpp_extension on first use, as
one module per ISA variant (`VARIANTS`, best first) compiled with that variant's explicit flags
(never -march=native), and cached on disk. At load time `choose_variant` picks the best variant the
CPU's flags allow and logs it; a variant that fails to build is logged (variant and compiler error)
and the next one is tried, ending at the pure-torch reference path. `load_kernels(variant)` loads
one named variant (tests, the benchmark). The `scalar` variant is portable reference-quality C++
for CPUs without AVX2 + FMA (or not x86); choosing it logs a warning.

First build per variant on the 2-core dev box (gcc 12, ninja): ~20 s, almost all of it parsing
torch/extension.h; later processes load the cached .so in ~0.1 s (torch only rebuilds when the
source or flags change; ninja tracks the csrc/*.h headers). torch's JIT loader requires the `ninja`
executable: the `ninja` pip package provides one and is put on PATH here if it isn't already.

Env (read once, at the first kernel lookup; not on every call):
  TANDEM_DISABLE_KERNELS=1   never build/load the kernel; always use the reference path.
  TANDEM_KERNEL_CACHE=DIR    build directory root; each variant builds in DIR/<variant> (default
                             ~/.cache/tandem/kernels/<torch version>/<checkout>/<variant>; the
                             checkout tag keeps two checkouts from rebuilding each other's module).
                             Explicit ISA flags make a cached build valid on every CPU that has them,
                             so DIR may be shared across hosts.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from services import env
from services.engine import dtype_policy
from services.engine.blocks import cdiv

log = logging.getLogger(__name__)

_EXT_NAME = "tandem_cpu_kernels"
_SOURCES = [Path(__file__).resolve().parent / "csrc" / name
            for name in ("paged_attention.cpp", "fused_ops.cpp", "prefill_attention.cpp")]
# -fopenmp is required: at::parallel_for is a header template that only runs in parallel when the
# extension itself is compiled with OpenMP (it then shares torch's bundled libgomp.so.1 thread pool).
_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


@dataclass(frozen=True)
class KernelVariant:
    """One build of the kernel: the CPU flags it needs (/proc/cpuinfo names) and its ISA cflags.

    The module built from it reports `simd == name` (the C++ picks its vector path from the flags).
    """

    name: str
    needs: frozenset[str]
    cflags: tuple[str, ...]


_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx2", "fma")
VARIANTS: tuple[KernelVariant, ...] = (  # best first
    KernelVariant("avx512_bf16", frozenset(_AVX512 + ("avx512_bf16",)),
                  ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx2", "-mfma")),
    KernelVariant("avx512", frozenset(_AVX512), ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma")),
    KernelVariant("avx2", frozenset({"avx2", "fma"}), ("-mavx2", "-mfma")),
    KernelVariant("scalar", frozenset(), ()),
)
_BY_NAME = {v.name: v for v in VARIANTS}
# torch.backends.cpu.get_cpu_capability() -> flags, for hosts without /proc/cpuinfo. torch's
# "AVX512" does not say whether AVX512-BF16 is there, so it maps to the plain avx512 variant.
_TORCH_CAPABILITY_FLAGS = {"AVX512": frozenset(_AVX512), "AVX2": frozenset({"avx2", "fma"})}


def runnable_variants(flags: frozenset[str] | set[str]) -> list[KernelVariant]:
    """The variants a CPU with `flags` can run, best first (always ends with scalar)."""
    return [v for v in VARIANTS if v.needs <= flags]


def choose_variant(flags: frozenset[str] | set[str]) -> str:
    """Name of the best variant a CPU with `flags` (/proc/cpuinfo names) can run."""
    return runnable_variants(flags)[0].name


def cpu_flags() -> frozenset[str]:
    """This CPU's ISA flags: /proc/cpuinfo's, as dtype_policy reads them (the one reader), else
    mapped from torch's CPU capability (hosts without /proc/cpuinfo)."""
    flags = dtype_policy.cpu_flags()
    if flags:
        return flags
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch
        capability = "DEFAULT"
    return _TORCH_CAPABILITY_FLAGS.get(capability, frozenset())


def kernel_build_dir(variant: str) -> Path:
    """Where `variant` is built and cached (one directory per variant: torch's build.ninja is per dir)."""
    cache = env.kernel_cache()
    if cache is not None:
        return cache / variant
    # The checkout's path is part of the key: torch's build.ninja names its sources by absolute
    # path, so two checkouts sharing one directory would rebuild each other's module every load.
    here = hashlib.sha1(str(_SOURCES[0].parent).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "tandem" / "kernels" / torch.__version__ / here / variant


def _kernels_disabled() -> bool:
    """TANDEM_DISABLE_KERNELS, as read now (KernelLoader reads it once)."""
    return env.kernels_disabled()


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return  # torch raises a clear error, which we turn into the fallback warning
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_variant(variant: KernelVariant) -> ModuleType:
    """Build (first time) and load one variant's module. Raises on any failure (no compiler, no
    ninja, compile error, a module whose `simd` is not the variant's name)."""
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    build_dir = kernel_build_dir(variant.name)
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mod = load(
        name=f"{_EXT_NAME}_{variant.name}",
        sources=[str(s) for s in _SOURCES],
        extra_cflags=[*_CFLAGS, *variant.cflags],
        extra_ldflags=_LDFLAGS,
        build_directory=str(build_dir),
        verbose=False,
    )
    simd = getattr(mod, "simd", None)
    if simd != variant.name:
        raise RuntimeError(f"the module built with {' '.join(variant.cflags) or 'no ISA flags'} reports "
                           f"simd={simd!r}, not {variant.name!r} (did the compiler ignore the flags?)")
    log.info("loaded %s_%s from %s in %.1fs", _EXT_NAME, variant.name, build_dir, time.perf_counter() - t0)
    return mod


def _error_summary(e: BaseException, limit: int = 800) -> str:
    """One line naming why a build failed: the exception's first line plus the compiler's error lines
    (torch's message is the whole ninja log, command lines included)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    errors = [line for line in lines[1:] if "error" in line.lower()][:3]
    return f"{type(e).__name__}: " + " | ".join([lines[0][:200], *errors])[:limit]


class KernelLoader:
    """Builds and caches one module per variant, and picks this process's default variant once.

    `build`, `flags` and `disabled` are injectable so tests can exercise the choice and the
    fallbacks without a compiler. `disabled` None: TANDEM_DISABLE_KERNELS, read at the first
    lookup and kept (the decode step looks the module up ~40 times). Thread-safe; a variant that
    failed to build is not retried (nor warned about again) by the same loader.
    """

    def __init__(self, flags: frozenset[str] | None = None,
                 build: Callable[[KernelVariant], ModuleType] = build_variant,
                 disabled: bool | None = None) -> None:
        self._flags = flags
        self._build = build
        self._disabled = disabled
        self._lock = threading.Lock()
        self._modules: dict[str, ModuleType] = {}
        self._errors: dict[str, str] = {}
        self._default: str | None = None  # chosen variant's name, "reference" if none built

    @property
    def disabled(self) -> bool:
        """Whether kernels are off (TANDEM_DISABLE_KERNELS, read once)."""
        if self._disabled is None:
            self._disabled = _kernels_disabled()
        return self._disabled

    def default(self) -> ModuleType | None:
        """The default module (see load()); after the first call a lock-free lookup."""
        chosen = self._default
        if chosen is not None:
            return self._modules.get(chosen)
        return self._load_default()

    @property
    def flags(self) -> frozenset[str]:
        if self._flags is None:
            self._flags = cpu_flags()
        return self._flags

    def runnable(self) -> list[str]:
        """Names of the variants this CPU can run, best first."""
        return [v.name for v in runnable_variants(self.flags)]

    def error(self, variant: str) -> str | None:
        """Why `variant` failed to build or load in this loader (None: it did not fail, or was not tried)."""
        return self._errors.get(variant)

    def load(self, variant: str | None = None) -> ModuleType | None:
        """The module of `variant` (default: the best one that builds); None if it failed to build or load.

        Raises ValueError for an unknown variant name or one this CPU cannot run (its code would
        die of SIGILL). The default choice is made once and logged with the reason; a failed build
        is logged as a warning naming the variant and the compiler error.
        """
        if variant is None:
            return self._load_default()
        v = _BY_NAME.get(variant)
        if v is None:
            raise ValueError(f"unknown kernel variant {variant!r}; known: {', '.join(_BY_NAME)}")
        missing = v.needs - self.flags
        if missing:
            raise ValueError(f"this CPU cannot run kernel variant {variant!r}: it lacks {' '.join(sorted(missing))}")
        with self._lock:
            return self._build_once(v)

    def _build_once(self, v: KernelVariant) -> ModuleType | None:
        if v.name in self._modules:
            return self._modules[v.name]
        if v.name in self._errors:
            return None
        try:
            mod = self._build(v)
        except Exception as e:  # no compiler, no ninja, compile error, wrong simd, ...
            self._errors[v.name] = _error_summary(e)
            log.warning("CPU attention kernel variant %s failed to build or load: %s", v.name, self._errors[v.name])
            log.debug("full build error for variant %s: %s", v.name, e)
            return None
        self._modules[v.name] = mod
        return mod

    def _load_default(self) -> ModuleType | None:
        with self._lock:
            if self._default is not None:
                return self._modules.get(self._default)
            candidates = runnable_variants(self.flags)
            best = candidates[0]
            for v in candidates:
                mod = self._build_once(v)
                if mod is None:
                    continue
                self._default = v.name
                if v is not best:
                    log.warning("CPU attention kernel: variant %s, not this CPU's best (%s), which failed to "
                                "build or load (see above): decode attention is slower than it could be", v.name, best.name)
                elif v.name == "scalar":
                    log.warning("CPU attention kernel: variant scalar, the slow portable path: this CPU lacks "
                                "avx2/fma (flags seen: %s)", " ".join(sorted(self.flags & {"avx", "avx2", "fma"})) or "none")
                else:
                    log.info("CPU attention kernel: variant %s (the best this CPU runs: it has %s)",
                             v.name, " ".join(sorted(v.needs)))
                return mod
            self._default = "reference"
            log.warning("CPU attention kernels unavailable (every variant failed to build or load: %s), using the "
                        "pure-torch reference path", ", ".join(v.name for v in candidates))
            return None


_loader = KernelLoader()


def load_kernels(variant: str | None = None) -> ModuleType | None:
    """The CPU kernel module: by default the best variant this CPU runs that builds (chosen once per
    process), else the named one. None if TANDEM_DISABLE_KERNELS is set (read once) or the build(s)
    failed (the callers then use the reference path). Raises ValueError for a variant this CPU
    cannot run. The default lookup is cheap after the first call (every decode layer makes it)."""
    if _loader.disabled:
        return None
    return _loader.default() if variant is None else _loader.load(variant)


def settle_threads_here() -> None:
    """Fix, on the calling thread, the torch thread count every loaded kernel module will use.

    Each module has its own copy of torch's lazy per-thread init (an inline function with a
    thread_local flag); left alone, it reads the process default at the thread's first kernel call,
    which may have changed since (engine_thread.serial_torch_elsewhere). Builds nothing."""
    for mod in list(_loader._modules.values()):
        if hasattr(mod, "init_parallel"):
            mod.init_parallel()


def available_variants() -> list[str]:
    """Names of the kernel variants this CPU can run, best first (built or not)."""
    return _loader.runnable()


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
    nblk = cdiv(max_len, bs)
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
    nblk = cdiv(max_len, bs)
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
