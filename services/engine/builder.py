"""Builds an engine from a model name or directory plus a few user-facing knobs."""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from services.engine.config import CacheConfig, EngineConfig, ModelConfigError, Role, SchedulerConfig
from services.engine.device import resolve_device  # noqa: F401  (re-exported: callers resolve names here)
from services.engine.engine import LLMEngine
from services.engine.loader import LoadedModel, resolve_model
from services.engine.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelConfigError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The model directory's tokenizer.json when present, else the byte-level tokenizer."""
    cfg = loaded.config
    if loaded.model_dir and os.path.isfile(os.path.join(loaded.model_dir, "tokenizer.json")):
        return Tokenizer.from_dir(loaded.model_dir, cfg.bos_token_id, cfg.eos_token_ids)
    return Tokenizer.byte_level(cfg.vocab_size)


def build_engine(model: str, *, dtype: str = "float32", device: str = "cpu", block_size: int = 16,
                 num_blocks: int | None = None, kv_memory_gib: float = 2.0,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                 role: Role = Role.COLOCATED, policy: str = "fcfs", num_threads: int | None = None,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 loaded: LoadedModel | None = None, gpu_memory_utilization: float | None = None) -> LLMEngine:
    """An engine for `model` (a named model or an HF directory) on `device` ("auto", "cpu", "cuda[:N]").

    KV cache size: num_blocks, else on CUDA gpu_memory_utilization (a share of the GPU, as vLLM's),
    else kv_memory_gib. Raises ModelConfigError (a message saying what to change) for a bad model,
    dtype, device or size.
    """
    loaded = loaded or resolve_model(model)
    model_cfg = loaded.config
    if max_model_len is not None:
        if not 0 < max_model_len <= model_cfg.max_position_embeddings:
            raise ModelConfigError(f"max_model_len must be in [1, {model_cfg.max_position_embeddings}], "
                                   f"got {max_model_len}")
        model_cfg = replace(model_cfg, max_position_embeddings=max_model_len)
    if block_size <= 0 or max_num_batched_tokens <= 0 or max_num_seqs <= 0:
        raise ModelConfigError("block_size, max_num_batched_tokens and max_num_seqs must be positive")
    config = EngineConfig(
        model=model_cfg,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          memory_budget_bytes=int(kv_memory_gib * (1 << 30)),
                          gpu_memory_utilization=gpu_memory_utilization,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(role=role, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens, policy=policy),
        device=resolve_device(device), dtype=parse_dtype(dtype), num_threads=num_threads)
    return LLMEngine(config, loaded, load_tokenizer(loaded))
