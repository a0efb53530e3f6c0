"""Which KV transport two peers use: ``--kv-transport auto|tcp|nccl|cuda_ipc`` on each side.

Each side describes itself in its HELLO as an ``Endpoint`` (its setting, its machine, its device).
``resolve`` is a pure function of the two endpoints, so the sender and the receiver reach the same
answer on their own, and a refusal names what differs and what to change:

- both settings explicit and different: refused;
- one explicit: that transport, if the pair can run it;
- both ``auto``: ``cuda_ipc`` when both caches are on the same GPU of one machine (NCCL refuses two
  ranks on one device), ``nccl`` when both are on GPUs (different ones) and both have NCCL,
  ``tcp`` otherwise.

Describing the local endpoint never initialises CUDA or imports CuPy for a CPU cache.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import socket
from dataclasses import dataclass

import torch

SETTINGS = ("auto", "tcp", "nccl", "cuda_ipc")
TRANSPORTS = ("tcp", "nccl", "cuda_ipc")


class TransportMismatch(ValueError):
    """The two endpoints cannot agree on a transport; the message says why and what to change."""


@dataclass(frozen=True)
class Endpoint:
    """One side of a KV connection, as its HELLO describes it."""

    setting: str              # its --kv-transport: auto | tcp | nccl | cuda_ipc
    host_id: str              # machine identity: hostname + boot id (processes that can share CUDA IPC)
    device: str = "cpu"       # "cpu" | "cuda"
    gpu_uuid: str = ""        # the GPU holding the cache (cuda only)
    nccl: bool = False        # CuPy with NCCL is importable here (cuda only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Endpoint":
        """Raises ValueError on a missing or malformed field."""
        try:
            ep = cls(setting=str(d["setting"]), host_id=str(d["host_id"]), device=str(d["device"]),
                     gpu_uuid=str(d.get("gpu_uuid", "")), nccl=bool(d.get("nccl", False)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed endpoint {d!r}: {e}") from e
        check_setting(ep.setting)
        return ep


def check_setting(setting: str) -> None:
    """Raises ValueError naming the flag when ``setting`` is not a known --kv-transport value."""
    if setting not in SETTINGS:
        raise ValueError(f"--kv-transport {setting!r} is not one of {', '.join(SETTINGS)}")


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """This machine: hostname plus the kernel's boot id (stable for the boot, shared by its processes)."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


@functools.lru_cache(maxsize=1)
def nccl_problem() -> str | None:
    """Why CuPy's NCCL binding cannot be used here, or None when it can. Imports CuPy: only ask
    for CUDA caches (and in GPU tests/benchmarks), never on a CPU host's path."""
    if importlib.util.find_spec("cupy") is None:
        return "needs cupy with NCCL (pip install .[gpu])"
    try:
        from cupy.cuda import nccl
    except Exception as e:       # ImportError, or a CUDA library missing at load time
        return f"needs cupy with NCCL (pip install .[gpu]): {e}"
    if not getattr(nccl, "available", True):
        return "needs cupy with NCCL (pip install .[gpu]): CuPy cannot load libnccl"
    return None


def nccl_available() -> bool:
    """CuPy's NCCL binding imports (only asked for CUDA caches: never imports CuPy on CPU hosts)."""
    return nccl_problem() is None


def gpu_uuid(device: torch.device) -> str:
    """A stable identity of the GPU (its UUID when torch reports one)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else f"{host_id()}#cuda:{index}"


def local_endpoint(setting: str, kv: torch.Tensor) -> Endpoint:
    """This side's endpoint for a cache tensor ``kv``. Raises ValueError for an unknown setting."""
    check_setting(setting)
    if kv.device.type != "cuda":
        return Endpoint(setting, host_id())
    return Endpoint(setting, host_id(), "cuda", gpu_uuid(kv.device), nccl_available())


def resolve(sender: Endpoint, receiver: Endpoint) -> str:
    """The transport the pair uses. Raises TransportMismatch with the reason and the fix."""
    explicit = {s for s in (sender.setting, receiver.setting) if s != "auto"}
    if len(explicit) > 1:
        raise TransportMismatch(
            f"kv transport differs: {sender.setting!r} on the sender, {receiver.setting!r} on the receiver; "
            f"start both with the same --kv-transport (or auto)")
    if explicit:
        chosen = explicit.pop()
        problem = _cannot_run(chosen, sender, receiver)
        if problem:
            raise TransportMismatch(f"--kv-transport {chosen} cannot connect these peers: {problem}; "
                                    f"use --kv-transport auto (or tcp) on both")
        return chosen
    for candidate in ("cuda_ipc", "nccl"):
        if not _cannot_run(candidate, sender, receiver):
            return candidate
    return "tcp"


def _cannot_run(transport: str, a: Endpoint, b: Endpoint) -> str | None:
    """Why ``transport`` cannot move KV between ``a`` and ``b``, or None when it can."""
    if transport == "tcp":
        return None
    cpu = [name for name, ep in (("sender", a), ("receiver", b)) if ep.device != "cuda"]
    if len(cpu) == 2:
        return "the sender and the receiver keep their KV caches on the CPU"
    if cpu:
        return f"the {cpu[0]} keeps its KV cache on the CPU"
    same_gpu = a.host_id == b.host_id and a.gpu_uuid == b.gpu_uuid
    if transport == "cuda_ipc":
        if a.host_id != b.host_id:
            return "CUDA IPC needs both processes on one machine"
        if not same_gpu:
            return "CUDA IPC here maps a peer's cache on the same GPU; these caches are on different GPUs"
        return None
    if same_gpu:
        return "both caches are on the same GPU, and NCCL refuses two ranks on one device"
    missing = [name for name, ep in (("sender", a), ("receiver", b)) if not ep.nccl]
    if missing:
        return f"CuPy with NCCL is not installed on the {' and '.join(missing)} (pip install .[gpu])"
    return None

