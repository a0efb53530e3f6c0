"""What the cluster tests share: streaming a request with raw stubs and reading worker state."""
from __future__ import annotations

import time

import grpc
import pytest

from services.member_tls import MemberTLS
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc


def generate(address: str, token_ids: list[int], max_tokens: int, timeout: float = 120.0, **params):
    """Stream one request; returns (token ids, messages). Checks the index contract on the way."""
    with grpc.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        req = serving_pb2.GenerateRequest(prompt_token_ids=token_ids,
                                          params=serving_pb2.SamplingParams(max_tokens=max_tokens, **params))
        tokens, messages = [], []
        for m in stub.Generate(req, timeout=timeout):
            assert m.index == len(tokens), f"index {m.index} after {len(tokens)} tokens"
            tokens += list(m.token_ids)
            messages.append(m)
        assert messages[-1].finished
        return tokens, messages


def instances(address: str) -> list[worker_pb2.LoadReport]:
    with grpc.insecure_channel(address) as channel:
        return list(admin_pb2_grpc.AdminStub(channel).ListInstances(admin_pb2.ListInstancesRequest(), timeout=10).instances)


def worker_channel(worker_address: str, tls: MemberTLS | None = None) -> grpc.Channel:
    """A channel to a worker: plaintext, or mutual TLS with a member's certificate (services/member_tls.py)."""
    if tls is None:
        return grpc.insecure_channel(worker_address)
    return grpc.secure_channel(worker_address, tls.channel_credentials(), options=tls.channel_options())


def worker_stats(worker_address: str, check_integrity: bool = True, tls: MemberTLS | None = None) -> worker_pb2.LoadReport:
    with worker_channel(worker_address, tls) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(check_integrity=check_integrity),
                                                         timeout=30)


def assert_no_leaks(address: str, timeout_s: float = 30.0, tls: MemberTLS | None = None) -> None:
    """Every instance: integrity check passes, no lease, no running request, no used block (the
    prefix cache's evictable blocks count as free). Cleanup is asynchronous, so poll."""
    deadline = time.monotonic() + timeout_s
    while True:
        problems = []
        for inst in instances(address):
            s = worker_stats(inst.address, tls=tls)
            if s.integrity_error:
                problems.append(f"{inst.instance_id}: {s.integrity_error}")
            if s.free_blocks != s.total_blocks or s.leases or s.reserved_blocks or s.running or s.waiting:
                problems.append(f"{inst.instance_id}: free {s.free_blocks}/{s.total_blocks}, leases {s.leases}, "
                                f"reserved {s.reserved_blocks}, running {s.running}, waiting {s.waiting}")
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError("leaks after the requests ended: " + "; ".join(problems))
        time.sleep(0.2)


@pytest.fixture(scope="session")
def hf_tiny(export_named):
    """hf_tiny(prompt, n): transformers' greedy tokens (ignore_eos) for prompt on the named `tiny`
    model's weights, cached for the session."""
    from tests.golden.hf_reference import hf_greedy
    cache = {}

    def get(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            cache[key] = hf_greedy(export_named("tiny"), [prompt], n, ignore_eos=True)[0][0]
        return cache[key]
    return get
