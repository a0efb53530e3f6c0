"""Failure paths of a real 1P+1D cluster: cancels in every phase, a lease whose KV never comes,
a killed worker, a layout mismatch, bad input. After each, nothing is held anywhere."""
from __future__ import annotations

import os
import threading
import time

import grpc
import pytest

from tandem import Client
from services.roles import pool_role
from tandem.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from tandem.local_cluster import LocalCluster
from tandem.v1 import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import random_prompts
from tests.integration.cluster_helpers import assert_no_leaks, generate, instances, worker_stats

pytestmark = pytest.mark.timeout(600)

# A small step budget makes a long prompt take many prefill steps, so cancels land mid-prefill.
WORKER_ARGS = ["--max-num-batched-tokens", "32", "--num-blocks", "600", "--layer-group", "1", "--lease-ms", "20000"]


@pytest.fixture(scope="module")
def cluster(export_named, tmp_path_factory):
    from tandem.redis_server import RedisServer
    with RedisServer() as redis, LocalCluster(export_named("tiny"), prefill=1, decode=1, redis_url=redis.url,
                                              worker_args=WORKER_ARGS,
                                              log_dir=str(tmp_path_factory.mktemp("logs"))) as c:
        yield c


def _stream(address, prompt, max_tokens, **kw):
    channel = grpc.insecure_channel(address)
    req = serving_pb2.GenerateRequest(prompt_token_ids=prompt, params=serving_pb2.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True), **kw)
    return channel, serving_pb2_grpc.ServingStub(channel).Generate(req, timeout=60)


@pytest.mark.parametrize("delay_s", [0.0, 0.005, 0.02, 0.05, 0.1, 0.2])
def test_cancel_at_any_moment_leaks_nothing(cluster, delay_s):
    """Long prompt (many prefill chunks, KV pushed per layer) cancelled after a delay: the cancel
    lands while queued, prefilling, transferring or decoding."""
    prompt = random_prompts([1500], 512, seed=int(delay_s * 1000))[0]
    channel, call = _stream(cluster.address, prompt, 200)
    time.sleep(delay_s)
    call.cancel()
    channel.close()
    assert_no_leaks(cluster.address)


@pytest.mark.parametrize("delay_s", [0.0, 0.001, 0.002, 0.004, 0.008, 0.016])
def test_cancel_at_each_moment_of_a_short_request_leaks_nothing(cluster, delay_s):
    """A 16-token prompt's whole path takes milliseconds: D reserving inside its Decode while P
    starts the prefill, P's transfer opening (its first frames held at D until the reservation
    lands), the commit, the first token, the decode. Cancels this far apart land in each of them."""
    prompt = random_prompts([16], 512, seed=100 + int(delay_s * 1000))[0]
    channel, call = _stream(cluster.address, prompt, 50)
    time.sleep(delay_s)
    call.cancel()
    channel.close()
    assert_no_leaks(cluster.address)


def test_cancel_during_decode_after_tokens_arrive(cluster):
    prompt = random_prompts([40], 512, seed=3)[0]
    channel, call = _stream(cluster.address, prompt, 400)
    got = 0
    for m in call:
        got += len(m.token_ids)
        if got >= 3:
            break
    call.cancel()
    channel.close()
    assert_no_leaks(cluster.address)


def test_abort_rpc_ends_the_stream_with_abort(cluster):
    prompt = random_prompts([30], 512, seed=4)[0]
    channel, call = _stream(cluster.address, prompt, 1000, request_id="to-abort")
    first = next(call)
    assert first.index == 0
    with Client(cluster.address) as c:
        assert c.abort("to-abort")
    last = None
    for last in call:
        pass
    assert last.finished and last.finish_reason == serving_pb2.FINISH_REASON_ABORT
    channel.close()
    assert_no_leaks(cluster.address)


def test_client_deadline_cancels_everywhere(cluster):
    prompt = random_prompts([1200], 512, seed=5)[0]
    with Client(cluster.address) as c:
        with pytest.raises(DeadlineExceededError) as e:
            c.complete(token_ids=prompt, max_tokens=500, timeout=0.3)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_no_leaks(cluster.address)


def test_lease_without_kv_is_released(cluster):
    decode = next(i for i in instances(cluster.address) if pool_role(i) == worker_pb2.ROLE_DECODE)
    with grpc.insecure_channel(decode.address) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        wr = worker_pb2.WorkerRequest(request_id="orphan", prompt_token_ids=list(range(3, 70)),
                                      params=serving_pb2.SamplingParams(max_tokens=4))
        handle = stub.Reserve(worker_pb2.ReserveRequest(request=wr, lease_ms=300), timeout=10).handle
        assert handle.num_blocks == -(-67 // handle.block_size) and handle.address
        held = worker_stats(decode.address)
        assert held.reserved_blocks == handle.num_blocks and held.leases == 1
        with pytest.raises(grpc.RpcError) as e:      # the stream waits for KV that never comes
            list(stub.Decode(worker_pb2.DecodeRequest(request_id="orphan", start_index=1), timeout=30))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "expired" in e.value.details()
    assert_no_leaks(cluster.address)


@pytest.mark.parametrize("field,kwargs", [
    ("prompt", dict(token_ids=[])),
    ("prompt", dict(token_ids=[5] * 3000)),
    ("max_tokens", dict(token_ids=[5, 6], max_tokens=0)),
    ("max_tokens", dict(token_ids=[5, 6], max_tokens=5000)),
    ("temperature", dict(token_ids=[5, 6], temperature=-1.0)),
    ("top_p", dict(token_ids=[5, 6], top_p=0.0)),
    ("top_p", dict(token_ids=[5, 6], top_p=1.5)),
    ("token_ids", dict(token_ids=[5, 512])),
    ("token_ids", dict(token_ids=[-1, 5])),
])
def test_bad_input_is_invalid_argument_naming_the_field(cluster, field, kwargs):
    kwargs.setdefault("max_tokens", 4)
    with Client(cluster.address) as c:
        with pytest.raises(InvalidArgumentError) as e:
            c.complete(**kwargs)
    assert field in e.value.details
    assert_no_leaks(cluster.address, timeout_s=5)


def test_unknown_model_is_invalid_argument(cluster):
    with grpc.insecure_channel(cluster.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(serving_pb2_grpc.ServingStub(ch).Generate(serving_pb2.GenerateRequest(
                prompt="hi", model="gpt-17", params=serving_pb2.SamplingParams(max_tokens=2)), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in e.value.details()


def test_concurrent_cancels_and_completions_leak_nothing(cluster):
    prompts = random_prompts([20, 300, 700, 64, 5, 900, 150, 33], 512, seed=9)
    errors = []

    def one(i, p):
        try:
            if i % 2:
                channel, call = _stream(cluster.address, p, 50)
                for m in call:
                    if m.index + len(m.token_ids) >= i:
                        break
                call.cancel()
                channel.close()
            else:
                generate(cluster.address, p, 10)
        except Exception as e:        # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert_no_leaks(cluster.address)


def test_a_full_decode_instance_refuses_at_once_and_the_request_queues_for_room(export_named, redis_url,
                                                                                tmp_path):
    """The router places from load reports; here D's is stale on purpose (heartbeat every 30 s)
    while a direct Reserve holds most of D's blocks. The request's Decode on D is refused at once
    (RESOURCE_EXHAUSTED, no waiting for the prefill), D publishes a fresh report, and the router,
    seeing D full, queues the request instead of failing it. Once the blocks are free (and D's
    report says so) the request is placed again and runs to its end; nothing leaks."""
    from tests.integration.http_helpers import scrape, value
    args = ["--num-blocks", "64", "--heartbeat-interval-s", "30", "--heartbeat-ttl-s", "60"]
    with LocalCluster(export_named("tiny"), prefill=1, decode=1, redis_url=redis_url, log_dir=str(tmp_path),
                      worker_args=args, metrics_port=0) as c:
        decode = next(i for i in instances(c.address) if pool_role(i) == worker_pb2.ROLE_DECODE)
        with grpc.insecure_channel(decode.address) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            hog = worker_pb2.WorkerRequest(request_id="hog", prompt_token_ids=[7] * 960,
                                           params=serving_pb2.SamplingParams(max_tokens=1))
            stub.Reserve(worker_pb2.ReserveRequest(request=hog, lease_ms=120_000), timeout=10)   # 60 of 64 blocks
            result = {}
            prompt = random_prompts([100], 512, seed=41)[0]                                     # needs 7
            runner = threading.Thread(target=lambda: result.update(out=generate(c.address, prompt, 8)))
            runner.start()
            deadline = time.monotonic() + 30
            while value(scrape(c.metrics_address), "tandem_router_queued_requests") != 1:
                assert time.monotonic() < deadline and runner.is_alive(), f"never queued: {result}"
                time.sleep(0.05)
            stub.Release(worker_pb2.ReleaseRequest(request_id="hog"), timeout=10)
            stub.SetState(worker_pb2.SetStateRequest(state="serving"), timeout=10)     # publishes the report
            runner.join(60)
        tokens, messages = result["out"]
        assert len(tokens) == 8 and messages[0].decode_instance == decode.instance_id
        with open(os.path.join(c.log_dir, f"{decode.instance_id}.log")) as f:
            assert "Decode RESOURCE_EXHAUSTED" in f.read()
        assert_no_leaks(c.address)


def test_killed_decode_worker_leaves_placement(export_named, redis_url, tmp_path):
    with LocalCluster(export_named("tiny"), prefill=1, decode=2, redis_url=redis_url, log_dir=str(tmp_path),
                      worker_args=["--num-blocks", "200", "--heartbeat-ttl-s", "1.5"]) as c:
        cluster_instances = instances(c.address)
        assert {i.instance_id for i in cluster_instances} == {"prefill-0", "decode-0", "decode-1"}
        c.kill("decode-1")
        deadline = time.monotonic() + 30
        while "decode-1" in {i.instance_id for i in instances(c.address)}:
            assert time.monotonic() < deadline, "a killed worker stayed in the registry"
            time.sleep(0.2)
        for p in random_prompts([10, 20, 30, 40], 512, seed=2):      # all land on the live decode
            _, messages = generate(c.address, p, 4)
            assert messages[0].decode_instance == "decode-0"
        c.kill("prefill-0")
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(c.address, max_retries=0) as client:
                    client.complete(token_ids=[5, 6, 7], max_tokens=2)
            except UnavailableError as e:
                assert "no prefill instance" in e.details
                break
            assert time.monotonic() < deadline, "requests kept going to a dead prefill worker"
            time.sleep(0.3)


def test_block_size_mismatch_is_refused_clearly(export_named, redis_url, tmp_path):
    with LocalCluster(export_named("tiny"), prefill=1, decode=1, redis_url=redis_url, log_dir=str(tmp_path),
                      worker_args=["--num-blocks", "200"], role_args={"decode": ["--block-size", "32"]}) as c:
        with grpc.insecure_channel(c.address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                list(serving_pb2_grpc.ServingStub(ch).Generate(serving_pb2.GenerateRequest(
                    prompt_token_ids=[5, 6, 7], params=serving_pb2.SamplingParams(max_tokens=3)), timeout=30))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "block_size" in e.value.details() and "16" in e.value.details() and "32" in e.value.details()
        assert_no_leaks(c.address)
