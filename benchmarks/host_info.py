"""What every benchmark prints beside its figures: the host, and what its memory can stream.

`host_line()` names the CPU model, torch's CPU capability (the SIMD level its kernels use), the
core count and the ISA features that decide the engine's dtype (native bf16 or not), as the
engine's own detection (services/engine/dtype_policy.py) reads them. Hosts differ
(AVX2-only vs AVX-512 with bf16): a figure without this line cannot be compared with another.
"""
from __future__ import annotations

import os
import platform
import time

import torch

_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def host_line() -> dict:
    """{"cpu", "torch_cpu_capability", "cores", "features", "torch"} for the machine this runs on."""
    from services.engine.dtype_policy import detect_capabilities

    caps = detect_capabilities("cpu")
    return {"cpu": caps.name or platform.machine(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "features": [f for f in _FEATURES if f in caps.cpu_flags],
            "torch": torch.__version__}


def read_bandwidth_gbs(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Best GB/s of summing a `mib` MiB float32 tensor (far beyond the caches) on `threads` threads.

    A sum reads every byte once and computes little: the rate a decode step's weight reads can reach.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.rand(mib * (1 << 20) // 4)        # random values: every page really backed
        x.sum()
        best = min(_time(x.sum) for _ in range(repeats))
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
