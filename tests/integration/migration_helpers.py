"""What the migration tests share: a stream read on a thread, finding where a request runs, and
starting a migration straight on a worker (to reach paths the admin API refuses early)."""
from __future__ import annotations

import threading
import time

import grpc

from services.roles import pool_role
from tandem.v1 import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.integration.cluster_helpers import instances, worker_stats


class Stream:
    """One Generate stream read on a thread. `reached(n)` waits until n tokens arrived."""

    def __init__(self, router: str, request_id: str, prompt: list[int], max_tokens: int, **params):
        self.request_id, self.tokens, self.messages = request_id, [], []
        self.error: grpc.RpcError | None = None
        self._cond = threading.Condition()
        self._done = False
        self._channel = grpc.insecure_channel(router)
        req = serving_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                          params=serving_pb2.SamplingParams(max_tokens=max_tokens, **params))
        self._call = serving_pb2_grpc.ServingStub(self._channel).Generate(req, timeout=300)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for m in self._call:
                with self._cond:
                    assert m.index == len(self.tokens), f"index {m.index} after {len(self.tokens)} tokens"
                    self.tokens += list(m.token_ids)
                    self.messages.append(m)
                    self._cond.notify_all()
        except grpc.RpcError as e:
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def reached(self, n: int, timeout: float = 120.0) -> bool:
        """True once n tokens arrived; False if the stream ended before."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.tokens) >= n or self._done, timeout)
            return len(self.tokens) >= n

    def cancel(self) -> None:
        self._call.cancel()

    def result(self, timeout: float = 300.0) -> list[int]:
        """The whole token list; raises the stream's RPC error if it failed."""
        self._thread.join(timeout)
        self._channel.close()
        if self.error is not None:
            raise self.error
        assert self.messages and self.messages[-1].finished, "the stream ended without a finished message"
        return self.tokens

    def decode_instances(self) -> list[tuple[int, str]]:
        """(index, instance) each time the router named the decode instance: the first and every move."""
        return [(m.index, m.decode_instance) for m in self.messages if m.decode_instance]


def decode_reports(router: str) -> dict[str, worker_pb2.LoadReport]:
    return {r.instance_id: r for r in instances(router) if pool_role(r) == worker_pb2.ROLE_DECODE}


def holder(router: str, request_id: str) -> worker_pb2.LoadReport | None:
    """The decode instance the request runs or waits on now."""
    for r in decode_reports(router).values():
        with grpc.insecure_channel(r.address) as ch:
            s = worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(list_requests=True), timeout=10)
        if any(q.request_id == request_id for q in s.requests):
            return r
    return None


def other(router: str, instance_id: str) -> worker_pb2.LoadReport:
    return next(r for i, r in sorted(decode_reports(router).items()) if i != instance_id)


def worker_migrate(src: worker_pb2.LoadReport, dst_id: str, dst_address: str, request_id: str = "",
                   timeout: float = 120.0) -> worker_pb2.MigrateResponse:
    with grpc.insecure_channel(src.address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Migrate(worker_pb2.MigrateRequest(
            request_id=request_id, destination_instance_id=dst_id, destination_address=dst_address,
            reason="manual"), timeout=timeout)


def set_state(report: worker_pb2.LoadReport, state: str) -> worker_pb2.LoadReport:
    with grpc.insecure_channel(report.address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).SetState(worker_pb2.SetStateRequest(state=state), timeout=10)


def wait_router_sees(router: str, instance_id: str, *states: str, timeout: float = 30.0) -> None:
    """Poll the router's Admin ListInstances (which refreshes the registry the router places from)
    until it shows `instance_id` in one of `states`; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (seen := decode_reports(router)[instance_id].state) not in states:
        assert time.monotonic() < deadline, f"the router still sees {instance_id} as {seen!r}, not one of {states}"
        time.sleep(0.05)


def free_and_total(report: worker_pb2.LoadReport) -> tuple[int, int, str]:
    s = worker_stats(report.address)
    return s.free_blocks, s.total_blocks, s.integrity_error
