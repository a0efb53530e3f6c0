"""A worker's Outputs stream and the router's OutputsHub, over a real in-process gRPC server whose
Generate streams scripted chunks through the worker's own OutputSinks.relay: the router reads every
chunk in order whichever path it took and however late the Outputs stream delivers it; without a
subscription everything comes on the request's stream; a subscription that ends fails the requests
reading it UNAVAILABLE when chunks were lost with it, and lets it finish when none were; a draining
worker's stream ends after its last request; nothing is left open afterwards."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from router.request.outputs_hub import OutputsHub
from services.worker.call_metadata import OUTPUTS_KEY
from services.worker.output_sinks import OutputSinks
from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.aio import run, serve_worker

pytestmark = pytest.mark.timeout(60)


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """Generate yields one chunk per prompt token (the token is the chunk's), the last finished,
    through OutputSinks.relay. `gate` holds the Outputs stream's messages back while clear."""

    def __init__(self):
        self.outputs = OutputSinks()
        self.gate = asyncio.Event()
        self.gate.set()
        self.kill_outputs = asyncio.Event()
        self.proceed = asyncio.Event()       # Generate waits for it before its last chunk when `hold`
        self.hold = False

    async def Generate(self, request, context):
        async def chunks():
            n = len(request.prompt_token_ids)
            for i, token in enumerate(request.prompt_token_ids):
                if i == n - 1 and self.hold:
                    await self.proceed.wait()
                yield worker_pb2.TokenChunk(index=i, token_ids=[token], finished=i == n - 1)
                await asyncio.sleep(0)
        async for chunk in self.outputs.relay(chunks(), context, request.request_id):
            yield chunk

    async def Outputs(self, request, context):
        sink = self.outputs.open(request.id)
        try:
            while True:
                chunks = await self._unless_killed(sink.take(), context)
                if not chunks:
                    return
                await self._unless_killed(self.gate.wait(), context)
                yield worker_pb2.OutputBatch(chunks=chunks)
        finally:
            self.outputs.close(sink)

    async def _unless_killed(self, awaitable, context):
        """awaitable's result; the Outputs stream aborts instead once kill_outputs is set."""
        work, killed = asyncio.ensure_future(awaitable), asyncio.ensure_future(self.kill_outputs.wait())
        await asyncio.wait({work, killed}, return_when=asyncio.FIRST_COMPLETED)
        if killed.done():
            work.cancel()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: the Outputs stream dies")
        killed.cancel()
        return work.result()


@contextlib.asynccontextmanager
async def harness():
    """(worker, its address, a router's pool, its hub): a ScriptedWorker on a real port and the
    router's end, all closed afterwards."""
    worker = ScriptedWorker()
    server, address = await serve_worker(worker)
    pool = WorkerPool()
    hub = OutputsHub(pool)
    try:
        yield worker, address, pool, hub
    finally:
        await hub.close()
        await pool.close()
        await server.stop(None)


async def subscribed(hub: OutputsHub, worker: ScriptedWorker, address: str) -> None:
    hub.watch({address})
    for _ in range(500):
        if len(worker.outputs):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker never saw the router's Outputs stream")


async def read(hub: OutputsHub, address: str, request_id: str, tokens: list[int]):
    call, sub = hub.call(address, "Generate", worker_pb2.WorkerRequest(request_id=request_id,
                                                                       prompt_token_ids=tokens), 30.0)
    return sub, [(c.index, list(c.token_ids), c.finished) async for c in hub.follow(call, sub, request_id)]


def expected(tokens: list[int]):
    return [(i, [t], i == len(tokens) - 1) for i, t in enumerate(tokens)]


@run
async def test_chunks_come_in_order_through_the_outputs_stream_even_when_it_lags():
    async with harness() as (worker, address, pool, hub):
        await subscribed(hub, worker, address)
        worker.gate.clear()            # the Outputs stream holds 5 chunks while the last one arrives
        asyncio.get_running_loop().call_later(0.3, worker.gate.set)
        tokens = [11, 12, 13, 14, 15, 16]
        sub, got = await read(hub, address, "r1", tokens)
        assert sub and got == expected(tokens)
        assert (worker.outputs.muxed_chunks, worker.outputs.own_chunks) == (5, 1)
        # many requests at once: each gets its own chunks, in order
        many = await asyncio.gather(*(read(hub, address, f"m{k}", [k * 10 + j for j in range(1, 9)])
                                      for k in range(1, 9)))
        for k, (_, got) in enumerate(many, start=1):
            assert got == expected([k * 10 + j for j in range(1, 9)])
        assert hub.followers == 0
    assert hub.subscriptions == 0


@run
async def test_without_a_subscription_the_request_stream_carries_everything():
    async with harness() as (worker, address, pool, hub):
        call = pool.stub(address).Generate(worker_pb2.WorkerRequest(request_id="r", prompt_token_ids=[5, 6, 7]))
        got = [(c.index, list(c.token_ids), c.finished) async for c in hub.follow(call, "", "r")]
        assert got == expected([5, 6, 7])
        assert (worker.outputs.muxed_chunks, worker.outputs.own_chunks) == (0, 3)
        # a call naming a subscription the worker does not have falls back the same way
        call = pool.stub(address).Generate(worker_pb2.WorkerRequest(request_id="s", prompt_token_ids=[8, 9]),
                                           metadata=((OUTPUTS_KEY, "nobody"),))
        assert [list(c.token_ids) async for c in call] == [[8], [9]]


@run
async def test_an_outputs_stream_that_dies_with_chunks_in_it_fails_their_request():
    async with harness() as (worker, address, pool, hub):
        await subscribed(hub, worker, address)
        worker.hold = True             # the request stops before its last chunk; its others are held
        worker.gate.clear()            # in the Outputs stream, which dies with them
        reading = asyncio.ensure_future(read(hub, address, "r", [1, 2, 3, 4]))
        for _ in range(500):
            if worker.outputs.muxed_chunks == 3:
                break
            await asyncio.sleep(0.01)
        worker.kill_outputs.set()
        for _ in range(500):
            if hub.subscriptions == 0:
                break
            await asyncio.sleep(0.01)
        assert hub.subscriptions == 0
        assert not reading.done()      # lost chunks show once the last chunk counts them
        worker.proceed.set()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await reading
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "after 0 of its 3 chunks" in e.value.details()
        assert hub.followers == 0 and len(worker.outputs) == 0


@run
async def test_a_request_whose_chunks_all_arrived_finishes_though_its_outputs_stream_died():
    async with harness() as (worker, address, pool, hub):
        await subscribed(hub, worker, address)
        worker.hold = True
        got = []
        call, sub = hub.call(address, "Generate", worker_pb2.WorkerRequest(request_id="r", prompt_token_ids=[1, 2, 3]),
                             30.0)
        follower = hub.follow(call, sub, "r")
        while len(got) < 2:            # both chunks before the last reached the router
            got.append((await follower.__anext__()).index)
        worker.kill_outputs.set()
        for _ in range(500):
            if hub.subscriptions == 0:
                break
            await asyncio.sleep(0.01)
        worker.proceed.set()
        last = await follower.__anext__()
        assert (got, last.index, last.finished, last.muxed_chunks) == ([0, 1], 2, True, 2)
        await follower.aclose()
        assert hub.followers == 0
    assert hub.subscriptions == 0


@run
async def test_a_draining_sink_ends_its_stream_once_its_requests_are_done():
    async with harness() as (worker, address, pool, hub):
        await subscribed(hub, worker, address)
        worker.hold = True
        reading = asyncio.ensure_future(read(hub, address, "r", [1, 2, 3]))
        for _ in range(500):
            if worker.outputs.muxed_chunks == 2:
                break
            await asyncio.sleep(0.01)
        worker.outputs.drain()         # the worker stops: the request in flight still finishes
        worker.proceed.set()
        _, got = await reading
        assert got == expected([1, 2, 3])
        for _ in range(500):
            if len(worker.outputs) == 0 and hub.subscriptions == 0:
                break
            await asyncio.sleep(0.01)
        assert len(worker.outputs) == 0 and hub.subscriptions == 0


def test_sink_ids_are_checked():
    sinks = OutputSinks()
    with pytest.raises(ValueError, match="empty"):
        sinks.open("")
    sink = sinks.open("a")
    with pytest.raises(ValueError, match="open already"):
        sinks.open("a")
    sinks.close(sink)
    assert len(sinks) == 0 and sink.closed
    sinks.open("a")
