"""--routing prefix through real clusters (router, worker processes, Redis): requests that share a
prefix go where it is cached and are served from the cache, greedy tokens still equal transformers',
the router's index follows real workers (a restarted worker leaves no stale entry), nothing leaks."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from router.cluster.prefix_index import PrefixIndex, PrefixIndexFollower
from services.engine.kv_cache import prefix_block_hashes
from tandem.local_cluster import LocalCluster
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy
from tests.integration.cluster_helpers import assert_no_leaks, generate
from tandem.v1 import serving_pb2, serving_pb2_grpc

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 8
BLOCK = 16
WORKER_ARGS = ["--dtype", "float32", "--num-blocks", "200", "--block-size", str(BLOCK)]


def shared_prefix_prompts(n_apps: int, per_app: int, prefix_len: int, tail_len: int, seed: int):
    """per_app prompts for each of n_apps system prompts: system prompt + a tail of its own."""
    systems = random_prompts([prefix_len] * n_apps, 512, seed=seed)
    tails = random_prompts([tail_len] * (n_apps * per_app), 512, seed=seed + 1)
    return [systems[i % n_apps] + tails[i] for i in range(n_apps * per_app)]


def index_of(redis_url: str, instance_ids: list[str], until, timeout_s: float = 10.0) -> PrefixIndex:
    """The router's view, built in this process from the cluster's Redis; polled until `until(index)`."""
    async def main():
        index = PrefixIndex()
        follower = PrefixIndexFollower(redis_url, "default", index, lambda: instance_ids, block_ms=50)
        await follower.start()
        try:
            deadline = time.monotonic() + timeout_s
            while not until(index) and time.monotonic() < deadline:
                await follower.poll()
            return index
        finally:
            await follower.stop()
    return asyncio.run(main())


def test_colocated_prefix_routing_serves_each_system_prompt_from_cache_and_keeps_goldens(
        export_named, redis_url, tmp_path):
    """Requests of two applications, one at a time, while a long request decodes on colocated-0:
    each application's later requests go where its system prompt is cached and are served from
    that cache (which instance comes first is the unit tests' business: test_prefix_events.py)."""
    model_dir = export_named("tiny")
    prompts = shared_prefix_prompts(n_apps=2, per_app=3, prefix_len=96, tail_len=9, seed=11)
    long_prompt = random_prompts([8], 512, seed=12)[0]
    expected = [ids for ids, _ in hf_greedy(model_dir, prompts, MAX_TOKENS)]
    with LocalCluster(model_dir, redis_url=redis_url, worker_args=WORKER_ARGS + ["--heartbeat-interval-s", "0.1"],
                      log_dir=str(tmp_path), colocated=2, prefill=0, decode=0, routing="prefix", pools="fixed",
                      router_args=["--no-reschedule"]) as c:     # a migration would copy a prefix to the other
        results = {0: generate(c.address, prompts[0], MAX_TOKENS)}
        with grpc.insecure_channel(c.address) as channel:                   # decode load beside the prefills
            stream = serving_pb2_grpc.ServingStub(channel).Generate(serving_pb2.GenerateRequest(
                prompt_token_ids=long_prompt, params=serving_pb2.SamplingParams(max_tokens=600, ignore_eos=True)),
                timeout=120)
            next(stream)
            time.sleep(0.3)
            results[1] = generate(c.address, prompts[1], MAX_TOKENS)
            for _ in stream:
                pass
        time.sleep(0.5)
        for i in range(2, len(prompts)):
            results[i] = generate(c.address, prompts[i], MAX_TOKENS)
            time.sleep(0.3)                           # the worker's events reach the router's index
        for i, (tokens, messages) in results.items():
            assert tokens == expected[i], f"prompt {i}"
            assert messages[-1].usage.cached_prompt_tokens == (0 if i < 2 else 96), f"prompt {i}"
        for app in (0, 1):
            placed = {results[i][1][0].prefill_instance for i in range(app, len(prompts), 2)}
            assert len(placed) == 1, f"app {app} placed on {placed}"
        assert_no_leaks(c.address)


def test_disaggregated_prefix_routing_reuses_the_prefill_cache_and_keeps_goldens(export_named, redis_url, tmp_path):
    model_dir = export_named("tiny")
    prompts = shared_prefix_prompts(n_apps=2, per_app=2, prefix_len=96, tail_len=9, seed=21)
    expected = [ids for ids, _ in hf_greedy(model_dir, prompts, MAX_TOKENS)]
    with LocalCluster(model_dir, redis_url=redis_url, worker_args=WORKER_ARGS, log_dir=str(tmp_path),
                      prefill=2, decode=1, routing="prefix", pools="fixed") as c:
        placed: dict[int, set[str]] = {0: set(), 1: set()}
        cached = []
        for i, prompt in enumerate(prompts):          # one at a time: each sees the caches of the last
            tokens, messages = generate(c.address, prompt, MAX_TOKENS)
            assert tokens == expected[i], f"prompt {i}"
            placed[i % 2].add(messages[0].prefill_instance)
            cached.append(messages[-1].usage.cached_prompt_tokens)
            time.sleep(0.3)                           # the worker's events reach the router's index
        assert all(len(v) == 1 for v in placed.values()), placed
        assert cached == [0, 0, 96, 96], cached
        assert_no_leaks(c.address)


def test_router_index_follows_real_workers_and_a_restart_leaves_nothing_stale(export_named, redis_url, tmp_path):
    model_dir = export_named("tiny")
    prompt = random_prompts([70], 512, seed=3)[0]
    hashes = prefix_block_hashes(prompt, BLOCK)                       # 4 full blocks
    with LocalCluster(model_dir, redis_url=redis_url, worker_args=WORKER_ARGS, log_dir=str(tmp_path),
                      colocated=1, prefill=0, decode=0, routing="prefix") as c:
        generate(c.address, prompt, MAX_TOKENS)
        ids = ["colocated-0"]
        index = index_of(redis_url, ids, lambda ix: set(hashes) <= ix.hashes("colocated-0"))
        assert set(hashes) <= index.hashes("colocated-0")
        # Kill the worker (no goodbye) and start it again under the same id: its cache is empty,
        # and so is the index once it is back.
        spec = c.specs[0]
        old_address = c.wait_instances(1)[0].address
        c.kill(spec.instance_id)
        c._spawn(spec.instance_id, c.worker_command(spec))
        index = index_of(redis_url, ids, lambda ix: not ix.hashes("colocated-0"), timeout_s=60.0)
        assert index.hashes("colocated-0") == set()
        deadline = time.monotonic() + 60      # the dead worker's record lingers until the new one replaces it
        while [i.address for i in c.wait_instances(1)] == [old_address] and time.monotonic() < deadline:
            time.sleep(0.1)
        while True:                           # a client retries UNAVAILABLE ("...; retry") as told
            try:
                tokens, messages = generate(c.address, prompt, MAX_TOKENS)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert messages[-1].usage.cached_prompt_tokens == 0           # really computed again
        index = index_of(redis_url, ids, lambda ix: set(hashes) <= ix.hashes("colocated-0"))
        assert set(hashes) <= index.hashes("colocated-0")
        assert_no_leaks(c.address)
