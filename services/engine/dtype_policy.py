"""Which dtype an engine runs in: `--dtype auto` and the checks on an explicit one.

Detection and decision are apart: `detect_capabilities(device)` reads what the host has (CPU flags
from /proc/cpuinfo; on CUDA the compute capability), and `resolve_dtype` / `slower_dtype_warning`
/ `dtype_problem` are pure functions of a `DeviceCaps`, tested as a table over capability sets.

The rule (issue 14): bfloat16 on CUDA (float16 where the GPU has no native bfloat16, float32 where
it has no tensor cores either); on a CPU bfloat16 only where it has native bfloat16 matmul
(AVX512_BF16 or AMX-BF16), else float32 — on an AVX2-only host torch's bfloat16 matmul is ~8x
slower than float32 (measured). float16 is refused on a CPU (no native float16 matmul: 30-75x
slower than float32, measured on a Zen 4 core) and bfloat16 on a GPU without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

AUTO = "auto"
CONCRETE_DTYPES = ("float32", "bfloat16", "float16")
# What every --dtype flag (tandem run, tandem up, the worker) and the Helm chart accept.
DTYPE_CHOICES = (AUTO, *CONCRETE_DTYPES)
DTYPE_HELP = ("auto (default): bfloat16 where the device has native bfloat16 matmul (CUDA sm_80+, a CPU with "
              "AVX512_BF16 or AMX), float16 on older GPUs, else float32; or one of float32, bfloat16, float16")

_CPU_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512_BF16"}   # best first


@dataclass(frozen=True)
class DeviceCaps:
    """What one device offers the dtype decision. Build with `DeviceCaps.cpu(...)` / `.cuda(...)`
    (tests) or `detect_capabilities(device)` (the host)."""
    device_type: str                            # "cpu" | "cuda"
    cpu_flags: frozenset[str] = frozenset()     # /proc/cpuinfo flags, e.g. {"avx2", "avx512_bf16"}
    cuda_capability: tuple[int, int] | None = None
    cuda_bf16: bool = False                     # native bfloat16 (not emulated)
    name: str = ""                              # for messages: "NVIDIA A100 (sm_80)", a CPU model

    @classmethod
    def cpu(cls, flags=(), name: str = "") -> DeviceCaps:
        return cls("cpu", cpu_flags=frozenset(flags), name=name)

    @classmethod
    def cuda(cls, capability: tuple[int, int], bf16: bool | None = None, name: str = "") -> DeviceCaps:
        """bf16 None: native from compute capability 8.0 (Ampere) on."""
        return cls("cuda", cuda_capability=tuple(capability), name=name,
                   cuda_bf16=capability >= (8, 0) if bf16 is None else bf16)

    @property
    def cpu_bf16_feature(self) -> str | None:
        """The CPU's native bfloat16 matmul feature (AMX-BF16, AVX512_BF16), or None."""
        return next((label for flag, label in _CPU_BF16_FLAGS.items() if flag in self.cpu_flags), None)

    @property
    def tensor_cores(self) -> bool:
        """A CUDA GPU with half-precision tensor cores (Volta, sm_70, and newer)."""
        return self.cuda_capability is not None and self.cuda_capability >= (7, 0)

    @property
    def label(self) -> str:
        if self.device_type == "cuda":
            sm = "sm_%d%d" % self.cuda_capability if self.cuda_capability else "sm_?"
            return f"{self.name or 'this GPU'} ({sm})"
        return f"this CPU ({self.name})" if self.name else "this CPU"


class DtypeChoice(NamedTuple):
    dtype: str      # one of CONCRETE_DTYPES
    reason: str     # why, for the startup log


def dtype_problem(dtype: str, caps: DeviceCaps) -> str | None:
    """Why `dtype` (a concrete name) cannot run on the device, naming what to use; None when it can."""
    if caps.device_type == "cuda" and dtype == "bfloat16" and not caps.cuda_bf16:
        return f"{caps.label} has no native bfloat16; use --dtype float16 (or auto)"
    if caps.device_type == "cpu" and dtype == "float16":
        return ("float16 has no native matmul on a CPU (torch runs it 30-75x slower than float32); use --dtype auto "
                f"(here {resolve_dtype(AUTO, caps).dtype}), float32 or bfloat16")
    return None


def _auto(caps: DeviceCaps) -> DtypeChoice:
    if caps.device_type == "cuda":
        if caps.cuda_bf16:
            return DtypeChoice("bfloat16", f"{caps.label} has native bfloat16")
        if caps.tensor_cores:
            return DtypeChoice("float16", f"{caps.label} has no native bfloat16; float16 runs on its tensor cores")
        return DtypeChoice("float32", f"{caps.label} has no tensor cores: half precision is no faster there")
    feature = caps.cpu_bf16_feature
    if feature:
        return DtypeChoice("bfloat16", f"{caps.label} has {feature} (native bfloat16 matmul)")
    return DtypeChoice("float32", f"{caps.label} has no native bfloat16 matmul (no AVX512_BF16 or AMX-BF16): "
                                  "bfloat16 would run ~8x slower than float32")


def resolve_dtype(requested: str, caps: DeviceCaps) -> DtypeChoice:
    """The concrete dtype for `requested` ("auto" or a dtype name) on the device, and why.

    Raises ModelConfigError naming the choices for an unknown name, and naming
    what to use for a dtype the device cannot run (`dtype_problem`). Never touches a device.
    """
    from services.engine.config import ModelConfigError

    if requested == AUTO:
        return _auto(caps)
    if requested not in CONCRETE_DTYPES:
        raise ModelConfigError(f"dtype {requested!r} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
    problem = dtype_problem(requested, caps)
    if problem:
        raise ModelConfigError(problem)
    return DtypeChoice(requested, "asked for with --dtype")


def slower_dtype_warning(requested: str, caps: DeviceCaps) -> str | None:
    """A warning naming the faster dtype when an explicit, runnable `requested` is far slower (about
    4x or more in matmul throughput) on this device than another; None otherwise ("auto", unknown
    or refused names, or a dtype within ~2x of the best).

    Far slower: bfloat16 on a CPU without native bfloat16 (~8x measured on AVX2); float32 on a CPU
    with AMX-BF16 (AMX tiles vs AVX-512 FMAs) or on a GPU with tensor cores (no TF32: 8-16x).
    float32 on an AVX512_BF16-only CPU is ~2x slower, not warned about.
    """
    if requested not in CONCRETE_DTYPES or dtype_problem(requested, caps):
        return None
    best = _auto(caps).dtype
    if requested == best:
        return None
    if caps.device_type == "cpu":
        if requested == "bfloat16":
            why = "has no native bfloat16 matmul (no AVX512_BF16 or AMX-BF16): bfloat16 runs ~8x slower than float32"
        elif requested == "float32" and "amx_bf16" in caps.cpu_flags:
            why = "has AMX-BF16: bfloat16 matmuls run several times faster than float32"
        else:
            return None
    elif requested == "float32" and caps.tensor_cores:
        why = f"has tensor cores for {best}: float32 matmuls (no TF32) run 8-16x slower"
    else:
        return None
    return f"--dtype {requested} is far slower on {caps.label}, which {why}; use --dtype {best} (or auto)"


def _cpu_info(path: str = "/proc/cpuinfo") -> tuple[frozenset[str], str]:
    """(flags, model name) of the first processor in /proc/cpuinfo; empty where there is none."""
    flags, name = frozenset(), ""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                elif key == "model name" and not name:
                    name = value.strip()
                if flags and name:
                    break
    except OSError:
        pass
    return flags, name


def cpu_flags() -> frozenset[str]:
    """This host's CPU flags as /proc/cpuinfo lists them (empty where there is none); the one
    reader, shared with the attention kernel's variant choice (attention_ops.cpu_flags)."""
    return _cpu_info()[0]


def detect_capabilities(device) -> DeviceCaps:
    """The capabilities of `device` (a torch.device or a resolved name). A CPU reads /proc/cpuinfo
    and never touches CUDA; a CUDA device asks torch for its compute capability and bfloat16."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        flags, name = _cpu_info()
        return DeviceCaps.cpu(flags, name)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return DeviceCaps.cuda(torch.cuda.get_device_capability(index), bf16=bf16,
                           name=torch.cuda.get_device_name(index))


def auto_dtype(device="cpu") -> str:
    """What `--dtype auto` resolves to on `device` of this host (e.g. for a benchmark that runs
    another system in the same dtype)."""
    return resolve_dtype(AUTO, detect_capabilities(device)).dtype
