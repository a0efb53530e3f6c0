"""A KV transfer that fails in a real 1P+1D cluster does not fail the request: the decode instance
recomputes the prompt and the first token instead, and the tokens still equal transformers'.

The decode worker advertises (--kv-advertise-address) a real TCP proxy in front of its data
plane (tests/integration/kv_proxy.py), so the failures are real: connections stall, drop or are
refused. The prefill worker's commit timeout is short so a stall fails in seconds. After each
failure the client sees the reason in the TTFT breakdown, the router counts it, the proxy goes
back to forwarding and the KV moves again, and nothing is held on either worker.
"""
from __future__ import annotations

import math

import pytest

from tandem.local_cluster import LocalCluster
from tandem.redis_server import RedisServer
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy
from tests.integration.cluster_helpers import assert_no_leaks, generate, instances
from tests.integration.http_helpers import scrape, value
from tests.integration.kv_proxy import KVProxy, free_port

pytestmark = pytest.mark.timeout(600)

LENGTHS = [40, 300]               # 300 tokens: five prefill chunks, each pushed layer by layer
MAX_TOKENS = 10
WORKER_ARGS = ["--dtype", "float32", "--max-num-batched-tokens", "64", "--num-blocks", "200", "--layer-group", "1"]


@pytest.fixture(scope="module")
def golden(export_named):
    model_dir = export_named("tiny")
    prompts = random_prompts(LENGTHS, 512, seed=21)
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(golden, tmp_path_factory):
    """(cluster, proxy): the decode worker's KV reachable only through the proxy."""
    kv_port = free_port()
    role_args = {"prefill": ["--transfer-timeout-s", "2"],
                 # a receive stalled inside a frame gives up after this (and frees the request's entry)
                 "decode": ["--transfer-timeout-s", "3", "--kv-port", str(kv_port)]}
    with RedisServer() as redis, KVProxy(("127.0.0.1", kv_port)) as proxy:
        role_args["decode"] += ["--kv-advertise-address", proxy.address]
        with LocalCluster(golden[0], prefill=1, decode=1, redis_url=redis.url, worker_args=WORKER_ARGS,
                          role_args=role_args, metrics_port=0, log_dir=str(tmp_path_factory.mktemp("logs"))) as c:
            yield c, proxy


def fallbacks(c) -> float:
    return value(scrape(c.metrics_address), "tandem_kv_fallbacks_total", api="grpc")


def run_all(c, golden, **params) -> list[str]:
    """Every golden prompt, one at a time; checks tokens (and logprobs when asked) against
    transformers. Returns each request's kv_fallback reason."""
    _, prompts, expected = golden
    reasons = []
    for i, (prompt, (ref_tokens, ref_logprobs)) in enumerate(zip(prompts, expected)):
        tokens, messages = generate(c.address, prompt, MAX_TOKENS, **params)
        assert tokens == ref_tokens, f"prompt {i} (len {len(prompt)})"
        if "logprobs" in params:
            got = [lp for m in messages for lp in m.logprobs]
            assert len(got) == len(tokens) and all(len(m.top_logprobs) == len(m.token_ids) for m in messages)
            assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(got, ref_logprobs)), (got, ref_logprobs)
        breakdown = messages[-1].ttft_breakdown
        reasons.append(breakdown.kv_fallback)
        assert (breakdown.kv_bytes > 0) != bool(breakdown.kv_fallback), breakdown
    return reasons


def test_kv_moves_through_the_proxy(cluster, golden):
    c, proxy = cluster
    decode = next(i for i in instances(c.address) if i.instance_id == "decode-0")
    assert decode.kv_address == proxy.address          # --kv-advertise-address is what peers see
    proxy.set_mode("forward")
    before = fallbacks(c)
    assert run_all(c, golden) == ["", ""]
    assert fallbacks(c) == before
    assert_no_leaks(c.address)


@pytest.mark.parametrize("mode", ["stall", "drop"])
def test_transfer_failing_mid_way_falls_back_to_recompute(cluster, golden, mode):
    c, proxy = cluster
    proxy.set_mode("forward")
    run_all(c, golden)                     # the prefill worker holds a live connection through the proxy
    before = fallbacks(c)
    proxy.set_mode(mode, after_bytes=3000)    # inside the first prompt's KV
    reasons = run_all(c, golden, logprobs=2)
    # the first prompt's KV is in flight: with a stall its commit times out; with a drop its pushes
    # (caught in the engine step) or its commit fail. The next cannot even connect.
    failed = ("KV commit",) if mode == "stall" else ("KV push", "KV commit")
    assert reasons[0].startswith(tuple(f"{f} to decode instance decode-0 failed: " for f in failed)), reasons
    assert all("decode-0" in r for r in reasons), reasons
    assert fallbacks(c) == before + len(reasons)
    assert_no_leaks(c.address)

    proxy.set_mode("forward")              # the data plane heals: the KV moves again
    assert run_all(c, golden) == ["", ""]
    assert_no_leaks(c.address)


def test_refused_connections_fall_back_to_recompute(cluster, golden):
    c, proxy = cluster
    proxy.set_mode("refuse")
    before = fallbacks(c)
    reasons = run_all(c, golden) + run_all(c, golden)
    assert all(reasons), reasons
    # the first may still have met the connection the proxy just closed; later ones cannot connect
    assert reasons[-1].startswith("cannot reach decode instance decode-0 at " + proxy.address), reasons
    assert fallbacks(c) == before + len(reasons)
    assert_no_leaks(c.address)

    proxy.set_mode("forward")
    assert run_all(c, golden) == ["", ""]
    assert_no_leaks(c.address)
