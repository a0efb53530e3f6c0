"""The rescheduler against scripted in-process decode workers (real gRPC servers answering Stats
from a script and recording Migrate): which Migrate calls a round makes, that a pair in a migration
is left alone until its call returns, that a failed call frees the pair, and that a drain moves
requests round after round until the instance reports drained. No cluster, no Redis."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from router.migration.policy import PolicyConfig
from router.migration.rescheduler import Rescheduler
from services.roles import WorkerState
from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.aio import run, serve_worker

pytestmark = pytest.mark.timeout(60)


class FakeDecode(worker_pb2_grpc.WorkerServicer):
    """Stats answers `report`; Migrate records its request, waits for `gate`, then answers as
    `answer` says (a MigrateResponse, or a StatusCode to abort with) and runs `on_migrate`."""

    def __init__(self, instance_id: str, calls: list, *, free: int, running: int, state: str = WorkerState.SERVING):
        self.report = worker_pb2.LoadReport(instance_id=instance_id, role=worker_pb2.ROLE_DECODE, state=state,
                                            total_blocks=100, free_blocks=free, running=running, block_size=16)
        self.calls, self.gate = calls, asyncio.Event()
        self.gate.set()
        self.answer: worker_pb2.MigrateResponse | grpc.StatusCode = worker_pb2.MigrateResponse(committed=True)
        self.on_migrate = lambda request: None

    async def Stats(self, request, context):
        return self.report

    async def Migrate(self, request, context):
        self.calls.append((self.report.instance_id, request.destination_instance_id, request.reason))
        await self.gate.wait()
        if isinstance(self.answer, grpc.StatusCode):
            await context.abort(self.answer, "scripted")
        self.on_migrate(request)
        return self.answer


class Registry:
    """The part of InstanceRegistry the rescheduler reads."""

    def __init__(self, fakes: dict[str, FakeDecode]):
        self.fakes = fakes

    def instances(self, role=None, states=(WorkerState.SERVING,)):
        return [f.report for _, f in sorted(self.fakes.items())
                if (role is None or f.report.role == role) and (states is None or f.report.state in states)]

    def get(self, instance_id):
        fake = self.fakes.get(instance_id)
        return None if fake is None else fake.report


class Cluster:
    def __init__(self, **fakes: FakeDecode):
        self.fakes = fakes

    async def __aenter__(self):
        self.servers = []
        for fake in self.fakes.values():
            server, fake.report.address = await serve_worker(fake)
            self.servers.append(server)
        self.pool = WorkerPool()
        self.rescheduler = Rescheduler(Registry(self.fakes), self.pool, PolicyConfig(), interval_s=0.01)
        return self

    async def __aexit__(self, *exc):
        await self.rescheduler.stop()
        await self.pool.close()
        for server in self.servers:
            await server.stop(None)

    async def settled(self) -> None:
        """Every Migrate this rescheduler started has returned."""
        while self.rescheduler._tasks:
            await asyncio.sleep(0.005)


@run
async def test_a_round_moves_from_the_fullest_to_the_freest():
    calls = []
    async with Cluster(a=FakeDecode("a", calls, free=10, running=9), b=FakeDecode("b", calls, free=90, running=1),
                       c=FakeDecode("c", calls, free=60, running=4)) as c:
        launched = await c.rescheduler.round()
        await c.settled()
        assert [(d.source, d.destination) for d in launched] == [("a", "b")]
        assert calls == [("a", "b", launched[0].reason)]
        assert (c.rescheduler.stats.started, c.rescheduler.stats.committed) == (1, 1)


@run
async def test_a_decode_instance_serving_both_roles_is_still_in_the_decode_group():
    calls = []
    fakes = dict(a=FakeDecode("a", calls, free=10, running=9), b=FakeDecode("b", calls, free=90, running=1))
    fakes["b"].report.role, fakes["b"].report.home_role = worker_pb2.ROLE_COLOCATED, worker_pb2.ROLE_DECODE
    async with Cluster(**fakes) as c:            # adaptive pools: b took a standing prefill share
        launched = await c.rescheduler.round()
        await c.settled()
        assert [(d.source, d.destination) for d in launched] == [("a", "b")]


@run
async def test_a_pair_in_a_migration_is_left_alone_until_its_call_returns():
    calls = []
    a, b = FakeDecode("a", calls, free=10, running=9), FakeDecode("b", calls, free=90, running=1)
    a.gate.clear()                      # the first Migrate is still copying
    async with Cluster(a=a, b=b) as c:
        assert len(await c.rescheduler.round()) == 1
        while not calls:
            await asyncio.sleep(0.005)
        assert await c.rescheduler.round() == []      # a and b are busy
        assert len(calls) == 1
        a.gate.set()
        await c.settled()
        assert len(await c.rescheduler.round()) == 1  # free again: the loads still call for a move
        await c.settled()
        assert [call[:2] for call in calls] == [("a", "b"), ("a", "b")]


@run
async def test_a_failed_migrate_call_is_counted_and_frees_the_pair():
    calls = []
    a, b = FakeDecode("a", calls, free=10, running=9), FakeDecode("b", calls, free=90, running=1)
    a.answer = grpc.StatusCode.RESOURCE_EXHAUSTED
    async with Cluster(a=a, b=b) as c:
        await c.rescheduler.round()
        await c.settled()
        assert (c.rescheduler.stats.started, c.rescheduler.stats.failed, c.rescheduler.stats.committed) == (1, 1, 0)
        assert c.rescheduler._busy == set()


@run
async def test_a_drain_moves_requests_round_after_round_until_the_instance_is_drained():
    calls = []
    a = FakeDecode("a", calls, free=70, running=3, state=WorkerState.DRAINING)
    b = FakeDecode("b", calls, free=90, running=1)

    def moved(request):                 # each committed migration takes one request off a
        a.report.running -= 1
        a.report.free_blocks += 10
        if a.report.running == 0:
            a.report.state = WorkerState.DRAINED
    a.on_migrate = moved
    async with Cluster(a=a, b=b) as c:
        assert await asyncio.wait_for(c.rescheduler.drain("a", timeout_s=30), 30) == (WorkerState.DRAINED, 0)
        assert [call[:2] for call in calls] == [("a", "b")] * 3
        assert {call[2] for call in calls} == {"drain"}
