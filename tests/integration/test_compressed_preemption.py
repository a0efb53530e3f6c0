"""Compressed preemption through a real cluster (router, colocated worker, Redis, gRPC): under a
KV pool too small for the load, `--preemption-mode compress` preempts by keeping int8 copies and
restores them; the worker's /metrics count both; every request completes; only a request that was
restored may differ from transformers' greedy tokens (no one else reads a restored block); and
nothing is left behind: blocks, leases, compressed bytes."""
from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.local_cluster import LocalCluster
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy
from tests.integration.cluster_helpers import assert_no_leaks, generate

pytestmark = pytest.mark.timeout(600)

WORKER_ARGS = ["--dtype", "float32", "--block-size", "8", "--num-blocks", "24", "--preemption-mode", "compress"]


def _metrics(address: str) -> dict[str, float]:
    """name{labels} → value of every sample in one scrape."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def _one(samples: dict[str, float], name: str, **labels) -> float:
    for key, v in samples.items():
        if key.split("{")[0] == name and all(f'{k}="{val}"' in key for k, val in labels.items()):
            return v
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_compressed_preemption_in_a_cluster(export_named, redis_url, tmp_path):
    model_dir = export_named("tiny")
    prompts = random_prompts([40, 37, 45, 30, 42, 38, 33, 41], 512, seed=11)
    n = 40
    expected = [ids[:n] for ids, _ in hf_greedy(model_dir, prompts, n, ignore_eos=True)]
    with LocalCluster(model_dir, prefill=0, decode=0, colocated=1, redis_url=redis_url, metrics_port=0,
                      worker_args=WORKER_ARGS, log_dir=str(tmp_path)) as c:
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: generate(c.address, p, n, ignore_eos=True), prompts))
        assert all(len(tokens) == n for tokens, _ in results)
        assert_no_leaks(c.address)
        (worker,) = c.worker_metrics.values()
        m = _metrics(worker)
        compressed = _one(m, "tandem_preemptions_total", mode="compress")
        restored = _one(m, "tandem_kv_restores_total")
        assert compressed >= 1 and restored >= 1
        assert _one(m, "tandem_preemptions_total", mode="recompute") == 0
        assert _one(m, "tandem_kv_compressed_bytes") == 0
    differing = sum(tokens != ref for (tokens, _), ref in zip(results, expected))
    assert differing <= restored
