"""GPU tests: skipped, each with its reason, where the machine cannot run them.

Markers: every test here needs a CUDA GPU; `nccl` ones also need CuPy with NCCL
(`pip install .[gpu]`); `multi_gpu` ones need two GPUs. Nothing here initialises CUDA or imports
CuPy on a machine without a GPU (torch.cuda.is_available() and importlib's find_spec only look).
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from services.transport.selection import nccl_problem
from tests.redis_fixtures import redis_server, redis_url  # noqa: F401  (pytest fixtures for the cluster tests)

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "nccl: needs CuPy with NCCL (pip install .[gpu])")
    config.addinivalue_line("markers", "multi_gpu: needs two CUDA GPUs")


@functools.lru_cache(maxsize=1)
def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    return None


def multi_gpu_skip_reason() -> str | None:
    n = torch.cuda.device_count()
    return None if n >= 2 else f"needs two CUDA GPUs (torch.cuda.device_count() is {n})"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        reason = cuda_skip_reason()
        if reason is None and item.get_closest_marker("multi_gpu"):
            reason = multi_gpu_skip_reason()
        if reason is None and item.get_closest_marker("nccl"):
            reason = nccl_problem()
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
