"""Where an engine runs: device names, dtype support, the KV cache's memory plan on CUDA, thread binding.

Nothing here touches CUDA unless a CUDA device was asked for: `resolve_device("auto")` only calls
torch.cuda.is_available() and torch.cuda.device_count(), which do not create a CUDA context
(torch.cuda.is_initialized() stays False), so a CPU machine never loads the CUDA runtime.
"""
from __future__ import annotations

import math

import torch

from services.engine import dtype_policy
from services.engine.config import EngineConfig, ModelConfigError

GIB = 1 << 30
# cuBLAS workspaces, the caching allocator's fragmentation, small temporaries.
_CUDA_SLACK_BYTES = 256 << 20


def resolve_device(name: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; 'cpu' and 'cuda[:N]' are checked.

    Raises ModelConfigError naming what to change for an unknown name, a CUDA device on a machine
    without one, or an index past the visible GPUs. Never initialises CUDA.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelConfigError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ModelConfigError(f"device {name!r}: this machine shows {torch.cuda.device_count()} CUDA GPU(s) "
                                   f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); pick one of those")
        return name
    if name != "cpu":
        raise ModelConfigError(f"device {name!r} is not supported; use auto, cpu or cuda[:N]")
    return name


def torch_device(name: str) -> torch.device:
    """The torch.device of a resolved name; a bare 'cuda' gets the current device's index, so tensors,
    generators and streams all name the same GPU."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dtype the device cannot run (ModelConfigError saying what to use instead).

    The rule is dtype_policy.dtype_problem: bfloat16 needs a GPU with native support (compute
    capability 8.0+, Ampere or newer); float16 is refused on a CPU (no native float16 matmul).
    """
    problem = dtype_policy.dtype_problem(str(dtype).removeprefix("torch."), dtype_policy.detect_capabilities(device))
    if problem:
        raise ModelConfigError(problem)


def bind_thread(device: torch.device) -> None:
    """Make `device` the current CUDA device of the calling thread (the engine thread: streams,
    events and generators a transport creates there then name the engine's GPU). No-op on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def weight_bytes(config: EngineConfig) -> int:
    """Bytes of the model's weights in the engine dtype (what the runner will allocate)."""
    from services.engine.loader import expected_shapes

    elem = torch.empty((), dtype=config.dtype).element_size()
    return sum(math.prod(shape) for shape in expected_shapes(config.model).values()) * elem


def activation_reserve_bytes(config: EngineConfig) -> int:
    """An upper estimate of one step's peak activation memory (kept free beside the KV cache).

    A full token budget through the widest layer (residual, norms, fused QKV, gate/up, SwiGLU),
    logits of a full batch in float32 with the sampler's temporaries, and the CUDA decode path's
    padded K/V gather for a full batch at the context limit.
    """
    m, s = config.model, config.scheduler
    elem = torch.empty((), dtype=config.dtype).element_size()
    tokens, rows = s.max_num_batched_tokens, min(s.max_num_seqs, s.max_num_batched_tokens)
    per_token = (4 * m.hidden_size + m.q_size + 2 * m.kv_size + 3 * m.intermediate_size) * elem
    logits = rows * m.vocab_size * 4 * 3
    gather = rows * config.max_model_len * m.kv_size * elem * 2
    return tokens * per_token + logits + gather + _CUDA_SLACK_BYTES


def plan_num_blocks(config: EngineConfig, device: torch.device) -> int:
    """How many KV blocks the engine allocates; call before anything is allocated.

    num_blocks wins; else on CUDA with cache.gpu_memory_utilization = u the KV cache takes
    u × the GPU's total memory, less this process's memory so far, the weights and an activation
    reserve (vLLM's gpu_memory_utilization: u is this instance's share of the GPU); else
    memory_budget_bytes. On CUDA, raises ModelConfigError (sizes and what to lower) when the
    weights and the KV cache would not fit in the GPU's free memory, or u leaves no block.
    """
    u = config.cache.gpu_memory_utilization
    if device.type != "cuda":
        return config.resolve_num_blocks()
    free, total = torch.cuda.mem_get_info(device)
    weights, per_block = weight_bytes(config), config.kv_bytes_per_block()
    if config.cache.num_blocks is not None or u is None:
        num_blocks = config.resolve_num_blocks()
        if weights + num_blocks * per_block > free:
            raise ModelConfigError(
                f"the KV cache ({num_blocks * per_block / GIB:.2f} GiB) and the weights ({weights / GIB:.2f} GiB) "
                f"need more than the {free / GIB:.2f} GiB free on {device}; lower --kv-memory-gib or --num-blocks")
        return num_blocks
    if not 0 < u <= 1:
        raise ModelConfigError(f"gpu_memory_utilization must be in (0, 1], got {u}")
    need = weights + activation_reserve_bytes(config)
    budget = int(u * total) - torch.cuda.memory_reserved(device) - need
    if budget < per_block:
        raise ModelConfigError(
            f"gpu_memory_utilization {u} gives {u * total / GIB:.2f} GiB of {device}, but weights and activations "
            f"need {need / GIB:.2f} GiB before any KV block; raise it or lower max_num_batched_tokens/max_num_seqs")
    if budget + need > free:
        raise ModelConfigError(
            f"gpu_memory_utilization {u} asks for {(budget + need) / GIB:.2f} GiB but {device} has "
            f"{free / GIB:.2f} GiB free (other processes hold the rest); lower it")
    return budget // per_block
