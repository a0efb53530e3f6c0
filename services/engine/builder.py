"""Builds an engine from a model name or directory plus a few user-facing knobs."""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from services.engine import dtype_policy
from services.engine.config import MIXED_PREFILL_MODES, CacheConfig, EngineConfig, ModelConfigError, SchedulerConfig
from services.engine.preemption import PREEMPTION_MODES
from services.engine.device import resolve_device, torch_device  # resolve_device re-exported: callers use it here
from services.engine.engine import LLMEngine
from services.engine.loader import LoadedModel, resolve_model
from services.engine.queue_order import DEFAULT_AGING_S
from services.engine.tokenizer import Tokenizer
from services.roles import Role

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in dtype_policy.CONCRETE_DTYPES}


def resolve_engine_dtype(requested: str, device: str) -> torch.dtype:
    """`requested` ("auto" or a name) on the resolved `device`, logged with the reason; an explicit
    dtype the device runs far slower than another is logged as a warning naming the faster one.
    Raises ModelConfigError for an unknown name or a dtype the device cannot run."""
    caps = dtype_policy.detect_capabilities(torch_device(device))
    choice = dtype_policy.resolve_dtype(requested, caps)
    log.info("dtype %s (--dtype %s on %s): %s", choice.dtype, requested, device, choice.reason)
    warning = dtype_policy.slower_dtype_warning(requested, caps)
    if warning:
        log.warning("%s", warning)
    return DTYPES[choice.dtype]


def load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The tokenizer the model file carries (GGUF metadata), else the model directory's
    tokenizer.json when present, else the byte-level tokenizer."""
    cfg = loaded.config
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    if loaded.model_dir and os.path.isfile(os.path.join(loaded.model_dir, "tokenizer.json")):
        return Tokenizer.from_dir(loaded.model_dir, cfg.bos_token_id, cfg.eos_token_ids)
    return Tokenizer.byte_level(cfg.vocab_size)


def build_engine(model: str, *, dtype: str = "auto", device: str = "cpu", block_size: int = 16,
                 num_blocks: int | None = None, kv_memory_gib: float = 2.0,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                 role: Role = Role.COLOCATED, policy: str = "fcfs", num_threads: int | None = None,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 loaded: LoadedModel | None = None, gpu_memory_utilization: float | None = None,
                 aging_s: float = DEFAULT_AGING_S, mixed_prefill_tokens: int = 0,
                 displace_ratio: float = SchedulerConfig.displace_ratio,
                 mixed_prefill_mode: str = SchedulerConfig.mixed_prefill_mode,
                 preemption_mode: str = SchedulerConfig.preemption_mode,
                 kv_compress_fraction: float = SchedulerConfig.kv_compress_fraction) -> LLMEngine:
    """An engine for `model` (a named model, an HF directory or a GGUF file) on `device` ("auto", "cpu", "cuda[:N]").

    dtype: "auto" (dtype_policy: bfloat16 where the device has native bfloat16 matmul, else float16
    on older GPUs or float32) or float32, bfloat16, float16. KV cache size: num_blocks, else on CUDA
    gpu_memory_utilization (a share of the GPU, as vLLM's),
    else kv_memory_gib. mixed_prefill_tokens / mixed_prefill_mode: the cap on prompt tokens a step
    adds beside running decodes (0: none) and how a prompt shares those steps (SchedulerConfig).
    preemption_mode / kv_compress_fraction: what a request preempted for blocks loses, and the
    compressed copies' budget as a share of the KV pool (services/engine/preemption.py). Raises ModelConfigError (a message saying what to change) for a bad model,
    dtype, device or size.
    """
    device = resolve_device(device)
    torch_dtype = resolve_engine_dtype(dtype, device)       # before loading: a bad dtype fails fast
    loaded = loaded or resolve_model(model)
    model_cfg = loaded.config
    if max_model_len is not None:
        if not 0 < max_model_len <= model_cfg.max_position_embeddings:
            raise ModelConfigError(f"max_model_len must be in [1, {model_cfg.max_position_embeddings}], "
                                   f"got {max_model_len}")
        model_cfg = replace(model_cfg, max_position_embeddings=max_model_len)
    if block_size <= 0 or max_num_batched_tokens <= 0 or max_num_seqs <= 0:
        raise ModelConfigError("block_size, max_num_batched_tokens and max_num_seqs must be positive")
    if mixed_prefill_tokens < 0:
        raise ModelConfigError(f"mixed_prefill_tokens must be >= 0, got {mixed_prefill_tokens}")
    if mixed_prefill_mode not in MIXED_PREFILL_MODES:
        raise ModelConfigError(f"mixed prefill mode must be one of {', '.join(MIXED_PREFILL_MODES)}, "
                               f"got {mixed_prefill_mode!r}")
    if not (displace_ratio == 0 or displace_ratio >= 1):
        raise ModelConfigError(f"displace_ratio must be 0 (never displace) or >= 1 (how many times shorter a "
                               f"waiting request must be), got {displace_ratio}")
    if preemption_mode not in PREEMPTION_MODES:
        raise ModelConfigError(f"preemption mode must be one of {', '.join(PREEMPTION_MODES)}, got {preemption_mode!r}")
    if not 0 <= kv_compress_fraction <= 4:
        raise ModelConfigError(f"kv_compress_fraction must be in [0, 4] (a share of the KV pool), got {kv_compress_fraction}")
    config = EngineConfig(
        model=model_cfg,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          memory_budget_bytes=int(kv_memory_gib * (1 << 30)),
                          gpu_memory_utilization=gpu_memory_utilization,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(role=role, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens, policy=policy, aging_s=aging_s,
                                  displace_ratio=displace_ratio,
                                  mixed_prefill_tokens=mixed_prefill_tokens, mixed_prefill_mode=mixed_prefill_mode,
                                  preemption_mode=preemption_mode, kv_compress_fraction=kv_compress_fraction),
        device=device, dtype=torch_dtype, num_threads=num_threads)
    return LLMEngine(config, loaded, load_tokenizer(loaded))
