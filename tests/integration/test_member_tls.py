"""Mutual TLS between cluster members (issue 18, item 6; services/member_tls.py) on a real 1P+1D
cluster: requests flow router → prefill → decode over TLS with golden tokens and nothing leaked; a
worker refuses, in the handshake, a caller with no certificate, a caller with another CA's
certificate and a plaintext caller, and nothing is reserved for them; incomplete settings stop a
worker before it loads its model, with a message naming what to set."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from services.member_tls import MemberTLS, MemberTLSError, member_tls
from services.roles import pool_role
from tandem.local_cluster import LocalCluster
from tandem.v1 import serving_pb2, worker_pb2, worker_pb2_grpc
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy
from tests.integration.cluster_helpers import assert_no_leaks, generate, instances, worker_channel, worker_stats
from tests.tls_certs import write_certs

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    return write_certs(root / "members"), write_certs(root / "outsider", ca_name="another CA")


@pytest.fixture(scope="module")
def cluster(export_named, certs, tmp_path_factory):
    from tandem.redis_server import RedisServer
    members, _ = certs
    with RedisServer() as redis, LocalCluster(export_named("tiny"), prefill=1, decode=1, redis_url=redis.url,
                                              worker_args=["--dtype", "float32", "--num-blocks", "200"],
                                              pools="fixed", env=members.env(),
                                              log_dir=str(tmp_path_factory.mktemp("logs"))) as c:
        yield c


def _tls(files) -> MemberTLS:
    return member_tls(files.env())


def test_requests_cross_the_tls_links_with_golden_tokens(cluster, certs, export_named):
    prompts = random_prompts([5, 40], 512, seed=11)
    expected = [ids for ids, _ in hf_greedy(export_named("tiny"), prompts, MAX_TOKENS)]
    for prompt, ref in zip(prompts, expected):
        tokens, _ = generate(cluster.address, prompt, MAX_TOKENS)
        assert tokens == ref
    assert_no_leaks(cluster.address, tls=_tls(certs[0]))
    log = open(f"{cluster.log_dir}/decode-0.log").read()
    assert "mutual TLS on its gRPC port" in log


def _reserve(channel: grpc.Channel) -> None:
    request = worker_pb2.WorkerRequest(request_id="intruder", prompt_token_ids=list(range(3, 60)),
                                       params=serving_pb2.SamplingParams(max_tokens=4))
    worker_pb2_grpc.WorkerStub(channel).Reserve(worker_pb2.ReserveRequest(request=request, lease_ms=60_000),
                                                timeout=10)


def test_a_worker_refuses_callers_without_a_member_certificate(cluster, certs):
    members, outsider = certs
    decode = next(i for i in instances(cluster.address) if pool_role(i) == worker_pb2.ROLE_DECODE)
    no_cert = MemberTLS(cert=b"", key=b"", ca=_tls(members).ca)
    callers = {
        "plaintext": grpc.insecure_channel(decode.address),
        "another CA": worker_channel(decode.address, _tls(outsider)),
        "no client certificate": grpc.secure_channel(decode.address, grpc.ssl_channel_credentials(no_cert.ca),
                                                     options=no_cert.channel_options()),
    }
    for who, channel in callers.items():
        with channel, pytest.raises(grpc.RpcError) as e:
            _reserve(channel)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, who
    stats = worker_stats(decode.address, tls=_tls(members))
    assert stats.leases == 0 and stats.reserved_blocks == 0 and stats.free_blocks == stats.total_blocks
    assert not stats.integrity_error


def test_incomplete_settings_are_named(certs, tmp_path):
    members, _ = certs
    assert member_tls({}) is None
    partial = {k: v for k, v in members.env().items() if k != "TANDEM_TLS_CA"}
    with pytest.raises(MemberTLSError, match="TANDEM_TLS_CA not set"):
        member_tls(partial)
    with pytest.raises(MemberTLSError, match="cannot read it"):
        member_tls({**members.env(), "TANDEM_TLS_KEY": str(tmp_path / "missing.key")})
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(MemberTLSError, match="not a PEM file"):
        member_tls({**members.env(), "TANDEM_TLS_CERT": str(tmp_path / "junk.pem")})
    assert member_tls({**members.env(), "TANDEM_TLS_SERVER_NAME": "w.example"}).server_name == "w.example"


def test_a_worker_with_incomplete_settings_stops_before_loading(certs, export_named):
    members, _ = certs
    env = {k: v for k, v in members.env().items() if k != "TANDEM_TLS_KEY"}
    done = subprocess.run([sys.executable, "-m", "services.worker", "--role", "decode", "--model", export_named("tiny")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "TANDEM_TLS_KEY not set" in done.stderr and "Traceback" not in done.stderr
