"""The adaptive-pool role switcher against scripted in-process workers (real gRPC servers answering
Stats from a script and SetRole as told): under prefill pressure the decode instance with headroom
is asked to take prefill too (exactly one SetRole, its answer observed by the registry); a switch
the worker refuses changes nothing on the router and is not retried within the dwell time."""
from __future__ import annotations

import grpc
import pytest

from router.cluster.role_policy import RolePolicyConfig
from router.cluster.role_switcher import RoleSwitcher
from services.roles import WorkerState
from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.aio import run, serve_worker

pytestmark = pytest.mark.timeout(60)


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """Stats answers `report`; SetRole records its request and applies it, or aborts with `refuse`."""

    def __init__(self, report: worker_pb2.LoadReport, calls: list):
        self.report, self.calls = report, calls
        self.refuse: grpc.StatusCode | None = None

    async def Stats(self, request, context):
        return self.report

    async def SetRole(self, request, context):
        self.calls.append((self.report.instance_id, request.role, request.mixed_prefill_tokens))
        if self.refuse is not None:
            await context.abort(self.refuse, "scripted: draining")
        new = worker_pb2.LoadReport()
        new.CopyFrom(self.report)
        new.role, new.updated_unix_ms = request.role, self.report.updated_unix_ms + 1
        new.mixed_prefill_tokens = request.mixed_prefill_tokens
        self.report = new
        return new


class Registry:
    """The part of InstanceRegistry the switcher reads and writes."""

    def __init__(self, fakes: dict[str, FakeWorker]):
        self.view = {i: f.report for i, f in fakes.items()}

    def instances(self, role=None, states=(WorkerState.SERVING,)):
        return [r for _, r in sorted(self.view.items()) if (role is None or r.role == role)
                and (states is None or r.state in states)]

    def observe(self, report):
        if report.updated_unix_ms >= self.view[report.instance_id].updated_unix_ms:
            self.view[report.instance_id] = report


def report(instance_id: str, role: int, **fields) -> worker_pb2.LoadReport:
    return worker_pb2.LoadReport(instance_id=instance_id, role=role, home_role=role, state=WorkerState.SERVING,
                                 total_blocks=100, free_blocks=90, block_size=16, updated_unix_ms=1000, **fields)


class Pools:
    """A prefill instance 20 s behind (20,000 tokens queued at 1,000 tokens/s) and an idle-ish
    decode instance (one request, 10 ms steps), served for real."""

    def __init__(self):
        self.calls: list = []
        self.fakes = {
            "p": FakeWorker(report("p", worker_pb2.ROLE_PREFILL, queued_prefill_tokens=20_000,
                                   prefill_tokens_per_s=1000.0), self.calls),
            "d": FakeWorker(report("d", worker_pb2.ROLE_DECODE, running=1, step_time_ms=10.0,
                                   prefill_tokens_per_s=4000.0), self.calls)}

    async def __aenter__(self):
        self.servers = []
        for fake in self.fakes.values():
            server, fake.report.address = await serve_worker(fake)
            self.servers.append(server)
        self.registry = Registry(self.fakes)
        self.pool = WorkerPool()
        self.switcher = RoleSwitcher(self.registry, self.pool, RolePolicyConfig(ttft_slo_s=2.0, tpot_slo_s=0.1))
        return self

    async def __aexit__(self, *exc):
        await self.switcher.stop()
        await self.pool.close()
        for server in self.servers:
            await server.stop(None)


@run
async def test_prefill_pressure_makes_the_decode_instance_with_headroom_take_prefill_too():
    async with Pools() as pools:
        decision = await pools.switcher.round()
        assert (decision.instance_id, decision.role) == ("d", worker_pb2.ROLE_COLOCATED)
        assert pools.calls == [("d", worker_pb2.ROLE_COLOCATED, decision.mixed_prefill_tokens)]
        assert decision.mixed_prefill_tokens >= RolePolicyConfig().min_mixed_tokens
        assert pools.registry.view["d"].role == worker_pb2.ROLE_COLOCATED    # placement sees it at once
        assert pools.switcher.switches == 1
        assert await pools.switcher.round() is None          # dwell: no second switch of d so soon
        assert len(pools.calls) == 1


@run
async def test_a_refused_switch_changes_nothing_and_is_not_retried_within_the_dwell_time():
    async with Pools() as pools:
        pools.fakes["d"].refuse = grpc.StatusCode.FAILED_PRECONDITION
        assert await pools.switcher.round() is None
        assert pools.calls == [("d", worker_pb2.ROLE_COLOCATED, pools.calls[0][2])]
        assert pools.registry.view["d"].role == worker_pb2.ROLE_DECODE and pools.switcher.switches == 0
        assert await pools.switcher.round() is None
        assert len(pools.calls) == 1


@run
async def test_a_new_cap_for_the_same_role_is_sent_but_not_counted_as_a_switch():
    async with Pools() as pools:
        first = await pools.switcher.round()
        assert first.role == worker_pb2.ROLE_COLOCATED and pools.switcher.switches == 1
        pools.fakes["d"].report.decode_step_time_ms = 70.0      # its batch grew: 0.8 x 100 - 70 ms of room
        pools.switcher.last_switch["d"] -= 10.0                 # past its dwell time
        recap = await pools.switcher.round()
        assert (recap.instance_id, recap.role) == ("d", worker_pb2.ROLE_COLOCATED) and "re-cap" in recap.reason
        assert recap.mixed_prefill_tokens < first.mixed_prefill_tokens
        assert pools.calls[-1] == ("d", worker_pb2.ROLE_COLOCATED, recap.mixed_prefill_tokens)
        assert pools.switcher.switches == 1
        assert pools.registry.view["d"].mixed_prefill_tokens == recap.mixed_prefill_tokens
