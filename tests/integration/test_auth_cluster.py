"""Authentication on a real 1P+1D cluster (issue 18, item 6): client API keys on gRPC and the
OpenAI API (missing, wrong and revoked keys refused with UNAUTHENTICATED / 401 naming the fix;
per-key counts in metrics), and a cluster token that worker RPCs require (a caller without it
reserves nothing). Health and metrics stay open."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth import CLUSTER_TOKEN_METADATA, key_label
from tandem import Client
from services.roles import pool_role
from tandem.errors import UnauthenticatedError
from tandem.local_cluster import LocalCluster
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.http_helpers import scrape, value

pytestmark = pytest.mark.timeout(600)

KEYS = ["key-one", "key-two"]
TOKEN = "cluster-secret"


@pytest.fixture(scope="module")
def cluster(export_named, tmp_path_factory):
    from tandem.redis_server import RedisServer
    with RedisServer() as redis, LocalCluster(export_named("tiny"), prefill=1, decode=1, redis_url=redis.url,
                                              worker_args=["--num-blocks", "200"], http_port=0, metrics_port=0,
                                              api_keys=KEYS, cluster_token=TOKEN, pools="fixed",
                                              log_dir=str(tmp_path_factory.mktemp("logs"))) as c:
        yield c


def _instances(c: LocalCluster) -> list[worker_pb2.LoadReport]:
    with grpc.insecure_channel(c.address) as ch:
        return list(admin_pb2_grpc.AdminStub(ch).ListInstances(admin_pb2.ListInstancesRequest(), timeout=10,
                                                               metadata=c.admin_metadata()).instances)


@pytest.mark.parametrize("api_key,says", [(None, "missing API key"), ("nope", "invalid API key"),
                                          ("key-zero", "unknown or revoked")])
def test_grpc_without_a_valid_key_is_unauthenticated(cluster, api_key, says):
    with Client(cluster.address, api_key=api_key, max_retries=0) as c:
        with pytest.raises(UnauthenticatedError) as e:
            c.complete(token_ids=[5, 6, 7], max_tokens=2)
    assert says in e.value.details and "api_key" in e.value.details


def test_every_configured_key_works_and_is_counted(cluster):
    before = {k: value(scrape(cluster.metrics_address), "tandem_api_key_requests_total", key=key_label(k))
              for k in KEYS}
    for key in KEYS:
        with Client(cluster.address, api_key=key) as c:
            r = c.complete(token_ids=[5, 6, 7], max_tokens=3)
        assert len(r.token_ids) == 3
    samples = scrape(cluster.metrics_address)
    for key in KEYS:
        assert value(samples, "tandem_api_key_requests_total", key=key_label(key)) >= before[key] + 1
    assert not any("key-one" in name or "key-one" in str(labels) for name, labels in samples)


def _model_id(c: LocalCluster) -> str:
    req = urllib.request.Request(f"http://{c.http_address}/v1/models", headers={"Authorization": "Bearer key-one"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def _post(c: LocalCluster, headers: dict) -> tuple[int, dict]:
    body = json.dumps({"model": _model_id(c), "prompt": [5, 6, 7], "max_tokens": 2}).encode()
    req = urllib.request.Request(f"http://{c.http_address}/v1/completions", body,
                                 {"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_api_needs_a_bearer_key(cluster):
    status, body = _post(cluster, {})
    assert status == 401 and "missing API key" in body["error"]["message"]
    assert body["error"]["type"] == "authentication_error"
    status, body = _post(cluster, {"Authorization": "Bearer revoked"})
    assert status == 401 and "invalid API key" in body["error"]["message"]
    status, body = _post(cluster, {"Authorization": "Bearer key-two"})
    assert status == 200 and body["choices"]
    with urllib.request.urlopen(f"http://{cluster.http_address}/health", timeout=10) as r:     # open
        assert r.status == 200


def test_health_stays_open(cluster):
    with grpc.insecure_channel(cluster.address) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_admin_needs_a_key_or_the_cluster_token(cluster):
    with grpc.insecure_channel(cluster.address) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10,
                                   metadata=(("authorization", "Bearer key-one"),)).instances
    assert len(_instances(cluster)) == 2


def test_a_worker_refuses_callers_without_the_cluster_token_and_reserves_nothing(cluster):
    decode = next(i for i in _instances(cluster) if pool_role(i) == worker_pb2.ROLE_DECODE)
    request = worker_pb2.WorkerRequest(request_id="intruder", prompt_token_ids=list(range(3, 60)),
                                       params=serving_pb2.SamplingParams(max_tokens=4))
    with grpc.insecure_channel(decode.address) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        for metadata in ((), ((CLUSTER_TOKEN_METADATA, "guess"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Reserve(worker_pb2.ReserveRequest(request=request, lease_ms=60_000), timeout=10,
                             metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "cluster token" in e.value.details()
        stats = stub.Stats(worker_pb2.StatsRequest(check_integrity=True), timeout=10,
                           metadata=((CLUSTER_TOKEN_METADATA, TOKEN),))
    assert stats.leases == 0 and stats.reserved_blocks == 0 and stats.free_blocks == stats.total_blocks
    assert not stats.integrity_error
