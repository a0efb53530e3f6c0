"""Greedy tokens through real clusters (router, workers, Redis, TCP KV transfer) equal
transformers' LlamaForCausalLM.generate on the same exported weights, and nothing leaks."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.local_cluster import LocalCluster
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy
from tests.integration.cluster_helpers import assert_no_leaks, generate

pytestmark = pytest.mark.timeout(600)

LENGTHS = [1, 5, 16, 17, 40, 100, 200, 333]
MAX_TOKENS = 12
# small per-step budget: long prompts are prefilled in several chunks, each pushed layer group by layer group
WORKER_ARGS = ["--dtype", "float32", "--max-num-batched-tokens", "64", "--num-blocks", "400", "--layer-group", "1"]


@pytest.fixture(scope="module")
def golden(export_named):
    model_dir = export_named("tiny")
    prompts = random_prompts(LENGTHS * 4, 512, seed=5)         # 32 prompts
    return model_dir, prompts, [ids for ids, _ in hf_greedy(model_dir, prompts, MAX_TOKENS)]


def run_concurrently(address, prompts, max_tokens):
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: generate(address, p, max_tokens), prompts))


@pytest.mark.parametrize("shape", [dict(prefill=1, decode=1), dict(prefill=2, decode=2), dict(prefill=0, decode=0, colocated=2)],
                         ids=["1P1D", "2P2D", "colocated"])
def test_cluster_matches_hf_with_32_concurrent_streams(golden, redis_url, tmp_path, shape):
    model_dir, prompts, expected = golden
    with LocalCluster(model_dir, redis_url=redis_url, worker_args=WORKER_ARGS, log_dir=str(tmp_path), **shape) as c:
        results = run_concurrently(c.address, prompts, MAX_TOKENS)
        for i, ((tokens, messages), ref) in enumerate(zip(results, expected)):
            assert tokens == ref, f"prompt {i} (len {len(prompts[i])})"
            final = messages[-1]
            assert final.usage.prompt_tokens == len(prompts[i]) and final.usage.completion_tokens == len(ref)
        # whole or handed off, every request's last message carries its TTFT breakdown (its arithmetic:
        # tests/unit/test_ttft_breakdown.py)
        assert all(ms[-1].HasField("ttft_breakdown") for _, ms in results)
        used = {m.prefill_instance for _, ms in results for m in ms[:1]}
        if shape.get("prefill", 0) == 2:       # (adaptive pools: a decode instance may serve some whole too)
            assert {"prefill-0", "prefill-1"} <= used, f"placement used only {used}"
        if shape.get("colocated", 0) == 2:
            assert len(used) == 2, f"placement used only {used}"
        assert_no_leaks(c.address)
