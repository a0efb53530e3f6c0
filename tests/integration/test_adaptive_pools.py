"""Adaptive pools on real clusters: role switches under load lose and duplicate no token (greedy
tokens equal transformers'), leave nothing behind, show in admin and metrics, and are refused
while an instance drains."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tandem.local_cluster import LocalCluster
from tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy
from tests.integration.cluster_helpers import assert_no_leaks, generate, instances

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 24
WORKER_ARGS = ["--dtype", "float32", "--max-num-batched-tokens", "64", "--num-blocks", "400"]


@pytest.fixture(scope="module")
def golden(export_named):
    model_dir = export_named("tiny")
    prompts = random_prompts([3, 17, 40, 90, 150, 200] * 4, 512, seed=21)
    return model_dir, prompts, [ids for ids, _ in hf_greedy(model_dir, prompts, MAX_TOKENS)]


def _set_role(worker_address: str, role: int, cap: int = 16) -> worker_pb2.LoadReport:
    with grpc.insecure_channel(worker_address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).SetRole(
            worker_pb2.SetRoleRequest(role=role, mixed_prefill_tokens=cap, reason="test"), timeout=30)


def _by_home(address: str) -> dict[int, worker_pb2.LoadReport]:
    return {r.home_role: r for r in instances(address)}


@pytest.mark.parametrize("mixed", ["chunked", "layered"])
def test_switches_mid_stream_keep_every_token(golden, redis_url, tmp_path, mixed):
    """The prefill instance serves both (so requests also run whole on it) while the decode
    instance flips between decode and both under 24 streams; each stream equals HF, with prompts
    mixed into decode steps token-chunked and layered alike."""
    model_dir, prompts, expected = golden
    with LocalCluster(model_dir, redis_url=redis_url, worker_args=WORKER_ARGS + ["--mixed-prefill", mixed],
                      log_dir=str(tmp_path), pools="fixed") as c:
        homes = _by_home(c.address)
        p, d = homes[worker_pb2.ROLE_PREFILL], homes[worker_pb2.ROLE_DECODE]
        _set_role(p.address, worker_pb2.ROLE_COLOCATED)
        deadline = time.monotonic() + 30
        while _by_home(c.address)[worker_pb2.ROLE_PREFILL].role != worker_pb2.ROLE_COLOCATED:   # the router's view
            assert time.monotonic() < deadline, "the router never saw the switch"
            time.sleep(0.05)
        stop = threading.Event()

        def flip():       # the decode instance: both, decode, both, ... while requests run
            role = worker_pb2.ROLE_COLOCATED
            while not stop.wait(0.05):
                _set_role(d.address, role)
                role = worker_pb2.ROLE_DECODE if role == worker_pb2.ROLE_COLOCATED else worker_pb2.ROLE_COLOCATED
        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda t: generate(c.address, t, MAX_TOKENS), prompts))
        finally:
            stop.set()
            flipper.join()
        for i, ((tokens, _), ref) in enumerate(zip(results, expected)):
            assert tokens == ref, f"prompt {i} (len {len(prompts[i])})"
        paths = {(m[0].prefill_instance == m[0].decode_instance) for _, m in results}
        assert paths == {True, False}, "some requests should have run whole on a switched instance, some split"
        assert all(r.role_switches > 0 for r in instances(c.address))
        _set_role(d.address, worker_pb2.ROLE_DECODE)
        _set_role(p.address, worker_pb2.ROLE_PREFILL)
        assert_no_leaks(c.address)


def test_adaptive_router_switches_under_a_prefill_burst(golden, redis_url, tmp_path):
    """With a tight TTFT SLO, a burst of prompts puts the decode instance in both; tokens hold."""
    model_dir, prompts, expected = golden
    router_args = ["--slo-ttft-s", "0.02", "--slo-tpot-s", "5", "--role-switch-dwell-s", "0.2"]
    with LocalCluster(model_dir, redis_url=redis_url, worker_args=WORKER_ARGS, router_args=router_args,
                      log_dir=str(tmp_path), pools="adaptive", metrics_port=0) as c:
        # Load runs until the leader switches a role: it decides on its own clock (every 0.25 s), and
        # a fast host may finish any one burst between two of its rounds.
        stop, results, deadline = threading.Event(), [], time.monotonic() + 180

        def client(offset: int) -> None:
            i = offset
            while not stop.is_set() and time.monotonic() < deadline:
                k = i % len(prompts)
                results.append((k, generate(c.address, prompts[k], MAX_TOKENS)[0]))
                i += 1
        with ThreadPoolExecutor(len(prompts)) as pool:
            running = [pool.submit(client, j) for j in range(len(prompts))]
            switched = 0
            while not switched and time.monotonic() < deadline and not any(f.done() for f in running):
                time.sleep(0.1)
                switched = sum(r.role_switches for r in instances(c.address))
            stop.set()
            for f in running:
                f.result()
        for n, (k, tokens) in enumerate(results):
            assert tokens == expected[k], f"request {n} (prompt {k})"
        assert switched > 0, "3 minutes of 24 streams against a 20 ms TTFT SLO should have switched a role"
        import urllib.request
        with urllib.request.urlopen(f"http://{c.metrics_address}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert "tandem_role_switches_total{" in text
        assert_no_leaks(c.address)


def test_set_role_refusals(golden, redis_url, tmp_path):
    model_dir, _, _ = golden
    with LocalCluster(model_dir, redis_url=redis_url, worker_args=WORKER_ARGS, log_dir=str(tmp_path),
                      pools="fixed") as c:
        homes = _by_home(c.address)
        p, d = homes[worker_pb2.ROLE_PREFILL], homes[worker_pb2.ROLE_DECODE]
        with pytest.raises(grpc.RpcError) as info:                 # a prefill instance never becomes decode-only
            _set_role(p.address, worker_pb2.ROLE_DECODE)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "switches to" in info.value.details()
        with grpc.insecure_channel(d.address) as channel:
            worker_pb2_grpc.WorkerStub(channel).SetState(worker_pb2.SetStateRequest(state="draining"), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            _set_role(d.address, worker_pb2.ROLE_COLOCATED)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "undo the drain" in info.value.details()
        report = next(r for r in instances(c.address) if r.instance_id == d.instance_id)
        assert report.role == worker_pb2.ROLE_DECODE and report.role_switches == 0      # not half-switched
