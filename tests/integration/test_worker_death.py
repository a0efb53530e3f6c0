"""Requests outlive a worker's death (issue 18, item 1) on a real 2P+2D cluster: a decode worker
SIGKILLed mid-stream (greedy and seeded), the source of a live migration SIGKILLed while it
migrates, a prefill worker SIGKILLed mid-prefill, and every decode worker gone. The client's stream
goes on with contiguous indexes and exactly the tokens of an uninterrupted run; the surviving
instances hold nothing afterwards.

The workers run float32: a recompute then reproduces the KV that incremental decoding built closely
enough for greedy ties not to flip (under bfloat16 a resumed request keeps every token exactly once,
but a near-tie late in the stream may go the other way than the uninterrupted run). Greedy outputs
are checked against transformers (tests/golden/hf_reference.py), seeded ones against an
uninterrupted run on the same cluster.

The tests share one cluster; each starts what it killed again before it ends (_heal)."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from services.roles import pool_role
from tandem.local_cluster import LocalCluster
from tandem.redis_server import RedisServer
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import random_prompts
from tests.integration.cluster_helpers import assert_no_leaks, generate, instances
from tests.integration.http_helpers import scrape, value

pytestmark = pytest.mark.timeout(600)

WORKER_ARGS = ["--dtype", "float32", "--num-blocks", "400", "--heartbeat-ttl-s", "1.5", "--heartbeat-interval-s", "0.5"]
# Prefill in 16-token steps, so a long prompt is still prefilling when the test kills its instance.
PREFILL_ARGS = ["--max-num-batched-tokens", "16"]


@pytest.fixture(scope="module")
def cluster(export_named, tmp_path_factory):
    with RedisServer() as redis, LocalCluster(export_named("tiny"), prefill=2, decode=2, redis_url=redis.url,
                                              worker_args=WORKER_ARGS, role_args={"prefill": PREFILL_ARGS},
                                              router_args=["--no-reschedule", "--poll-interval-s", "0.2"],
                                              pools="fixed", metrics_port=0,
                                              log_dir=str(tmp_path_factory.mktemp("logs"))) as c:
        yield c


def _wait_gone(cluster: LocalCluster, *names: str) -> None:
    """Until the router's registry no longer lists the killed instances (their records expired)."""
    deadline = time.monotonic() + 30
    while set(names) & {i.instance_id for i in instances(cluster.address)}:
        assert time.monotonic() < deadline, f"{names} stayed in the registry after SIGKILL"
        time.sleep(0.1)


def _heal(cluster: LocalCluster, *names: str) -> None:
    """The killed instances left the registry, the survivors hold nothing, and the killed ones run
    and are registered again."""
    _wait_gone(cluster, *names)
    assert_no_leaks(cluster.address)
    for name in names:
        cluster.restart(name)
    cluster.wait_instances(len(cluster.specs), timeout_s=120)


def _kill_mid_stream(cluster: LocalCluster, prompt: list[int], max_tokens: int, after: int, request_id: str,
                     also_kill=(), **params):
    """Stream a request and SIGKILL its decode instance (and `also_kill`) once `after` tokens
    arrived. Returns (tokens, messages, killed instance id); checks the index contract."""
    with grpc.insecure_channel(cluster.address) as channel:
        req = serving_pb2.GenerateRequest(prompt_token_ids=prompt, request_id=request_id,
                                          params=serving_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                            **params))
        tokens, messages, killed = [], [], None
        for m in serving_pb2_grpc.ServingStub(channel).Generate(req, timeout=120):
            assert m.index == len(tokens), f"index {m.index} after {len(tokens)} tokens"
            tokens += list(m.token_ids)
            messages.append(m)
            if killed is None and len(tokens) >= after:
                killed = messages[0].decode_instance
                cluster.kill(killed)
                for name in also_kill:
                    cluster.kill(name)
        return tokens, messages, killed


def _running(address: str) -> list[worker_pb2.RunningRequest]:
    with grpc.insecure_channel(address) as channel:
        return list(worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(list_requests=True),
                                                              timeout=5).requests)


def _live_decodes(cluster: LocalCluster) -> list[str]:
    return sorted(i.instance_id for i in instances(cluster.address)
                  if pool_role(i) == worker_pb2.ROLE_DECODE and cluster.procs[i.instance_id].poll() is None)


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.95, seed=1234)],
                         ids=["greedy", "seeded"])
def test_decode_sigkill_mid_stream_resumes_with_the_same_tokens(cluster, hf_tiny, params):
    prompt = random_prompts([24], 512, seed=7)[0]
    if params.get("temperature"):
        expected, _ = generate(cluster.address, prompt, 300, ignore_eos=True, **params)     # uninterrupted
    else:
        expected = hf_tiny(prompt, 300)
    before = value(scrape(cluster.metrics_address), "tandem_redispatches_total", reason="decode_lost") or 0
    tokens, messages, killed = _kill_mid_stream(cluster, prompt, 300, 20, f"kill-{len(params)}", **params)
    assert messages[-1].finished and messages[-1].finish_reason == serving_pb2.FINISH_REASON_LENGTH
    assert tokens == expected                                   # none lost, none repeated, same sampling
    assert messages[-1].usage.completion_tokens == 300
    resumed_on = [m.decode_instance for m in messages if m.decode_instance and m.decode_instance != killed]
    assert resumed_on and resumed_on[0] in _live_decodes(cluster)
    after = value(scrape(cluster.metrics_address), "tandem_redispatches_total", reason="decode_lost")
    assert after == before + 1
    _heal(cluster, killed)


def test_hung_decode_worker_is_noticed_by_its_missed_heartbeat(cluster, hf_tiny):
    """A decode worker that stops (SIGSTOP: no error on its stream, no heartbeat) is noticed once its
    registry record expires; the request resumes elsewhere with HF's tokens. Continued, the worker
    re-registers and holds nothing (the router cancelled its stream)."""
    prompt = random_prompts([28], 512, seed=12)[0]
    before = value(scrape(cluster.metrics_address), "tandem_redispatches_total", reason="heartbeat_missed") or 0
    stopped = None
    try:
        with grpc.insecure_channel(cluster.address) as channel:
            req = serving_pb2.GenerateRequest(prompt_token_ids=prompt, request_id="hung",
                                              params=serving_pb2.SamplingParams(max_tokens=300, ignore_eos=True))
            tokens, messages = [], []
            for m in serving_pb2_grpc.ServingStub(channel).Generate(req, timeout=120):
                assert m.index == len(tokens), f"index {m.index} after {len(tokens)} tokens"
                tokens += list(m.token_ids)
                messages.append(m)
                if stopped is None and len(tokens) >= 20:
                    stopped = messages[0].decode_instance
                    os.kill(cluster.procs[stopped].pid, signal.SIGSTOP)
    finally:
        if stopped is not None:
            os.kill(cluster.procs[stopped].pid, signal.SIGCONT)
    assert messages[-1].finished and tokens == hf_tiny(prompt, 300)
    assert any(m.decode_instance not in ("", stopped) for m in messages)
    after = value(scrape(cluster.metrics_address), "tandem_redispatches_total", reason="heartbeat_missed")
    assert after == before + 1
    cluster.wait_instances(len(cluster.specs), timeout_s=120)
    assert_no_leaks(cluster.address)


@pytest.mark.parametrize("delay_s", [0.0, 0.01])
def test_migration_source_sigkill_keeps_the_request(cluster, hf_tiny, delay_s):
    """The source of a live migration dies while it migrates (before or after the commit, as the
    timing falls): the surviving side keeps or takes the request, with the same tokens."""
    prompt = random_prompts([30], 512, seed=10)[0]
    expected = hf_tiny(prompt, 300)
    request_id = f"mig-kill-{delay_s}"
    with grpc.insecure_channel(cluster.address) as channel:
        req = serving_pb2.GenerateRequest(prompt_token_ids=prompt, request_id=request_id,
                                          params=serving_pb2.SamplingParams(max_tokens=300, ignore_eos=True))
        tokens, source, mover = [], None, None
        for m in serving_pb2_grpc.ServingStub(channel).Generate(req, timeout=120):
            assert m.index == len(tokens)
            tokens += list(m.token_ids)
            if source is None and len(tokens) >= 20:
                source = _holder(cluster, request_id)
                target = next(d for d in _live_decodes(cluster) if d != source)
                mover = threading.Thread(target=_migrate_quietly, args=(cluster.address, request_id, target))
                mover.start()
                time.sleep(delay_s)
                cluster.kill(source)
    mover.join(60)
    try:
        assert tokens == expected
    finally:
        _heal(cluster, source)


def test_prefill_sigkill_mid_prefill_is_retried_on_another(cluster, hf_tiny):
    prefills = [i for i in instances(cluster.address) if pool_role(i) == worker_pb2.ROLE_PREFILL]
    prompt = random_prompts([1900], 512, seed=8)[0]
    result = {}

    def run():
        try:
            with grpc.insecure_channel(cluster.address) as channel:
                req = serving_pb2.GenerateRequest(prompt_token_ids=prompt, request_id="kill-prefill",
                                                  params=serving_pb2.SamplingParams(max_tokens=16, ignore_eos=True))
                result["messages"] = list(serving_pb2_grpc.ServingStub(channel).Generate(req, timeout=120))
        except grpc.RpcError as e:
            result["error"] = e
    runner = threading.Thread(target=run)
    runner.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None:
        assert time.monotonic() < deadline and runner.is_alive(), f"never saw the prefill run: {result}"
        for p in prefills:          # the instance computing it now lists it
            if any(q.request_id == "kill-prefill" for q in _running(p.address)):
                killed = p.instance_id
                cluster.kill(killed)
                break
        time.sleep(0.005)
    runner.join(120)
    assert "error" not in result, result.get("error")
    messages = result["messages"]
    tokens = [t for m in messages for t in m.token_ids]
    assert [m.index for m in messages] == [sum(len(x.token_ids) for x in messages[:i]) for i in range(len(messages))]
    assert messages[0].prefill_instance != killed
    assert tokens == hf_tiny(prompt, 16)
    _heal(cluster, killed)


def test_no_decode_instance_left_is_unavailable_saying_so(cluster):
    """Every decode instance dies: the resume finds none and says what to do."""
    live = _live_decodes(cluster)
    prompt = random_prompts([20], 512, seed=9)[0]
    with pytest.raises(grpc.RpcError) as e:
        _kill_mid_stream(cluster, prompt, 400, 5, "kill-all", also_kill=live)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no decode instance is left" in e.value.details() and "start a decode worker" in e.value.details()
    _heal(cluster, *live)


def _holder(cluster: LocalCluster, request_id: str) -> str:
    """The decode instance running request_id now."""
    for name in _live_decodes(cluster):
        address = next(i.address for i in instances(cluster.address) if i.instance_id == name)
        if any(q.request_id == request_id for q in _running(address)):
            return name
    raise AssertionError(f"no decode instance runs {request_id}")


def _migrate_quietly(address: str, request_id: str, target: str) -> None:
    """Admin migrate; its source may die under it, so any answer is fine."""
    with grpc.insecure_channel(address) as channel:
        try:
            admin_pb2_grpc.AdminStub(channel).Migrate(admin_pb2.AdminMigrateRequest(
                request_id=request_id, to_instance_id=target), timeout=60)
        except grpc.RpcError:
            pass
