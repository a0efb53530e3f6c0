"""Shared fixtures: exported model directories and HF golden outputs, built once per session."""
from __future__ import annotations

import random

import tandem  # noqa: F401  (first: turns gRPC fork support off before any test starts gRPC)
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs a command's main() in process (router, worker) configures the root logger;
    later tests that read stderr must not inherit its handler or level."""
    import logging
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture(scope="session")
def export_named(tmp_path_factory):
    """export_named(name) → path of that named model exported as an HF directory (cached)."""
    from services.engine.builder import load_tokenizer
    from services.engine.loader import export_model, resolve_model

    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"model-{name}")
            loaded = resolve_model(name)
            export_model(loaded, str(path), load_tokenizer(loaded))
            cache[name] = str(path)
        return cache[name]

    return get


def random_prompts(lengths, vocab_size, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


# Whole-cluster tests (real workers, routers, Redis as child processes) are `slow` (so are a few that run
# the real smollm2 model for many seconds, marked where they are): `make test-fast`
# (pytest -m "not slow") runs the rest in about a minute; `make test` runs everything. Every test
# under these directories starts real processes; elsewhere a test says so with @pytest.mark.slow.
SLOW_DIRS = ("integration", "gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        if "tests" in parts and parts[parts.index("tests") + 1] in SLOW_DIRS:
            item.add_marker(pytest.mark.slow)
