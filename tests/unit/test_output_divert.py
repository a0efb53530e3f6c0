"""Outputs taken straight from the engine's hand-over (AsyncRequestStream.divert, output_sinks.py):
a request decoded by a real engine thread reaches a router's sink in order, with its last chunk on
its own stream counting the rest; outputs that arrive behind queued ones keep their order; a sink
that closes stops the diverting; nothing is left set or held afterwards."""
from __future__ import annotations

import asyncio

import pytest

from services.engine.builder import build_engine
from services.engine.engine import RequestOutput
from services.engine.engine_thread import EngineThread
from services.engine.loader import resolve_model
from services.engine.sampling_params import SamplingParams
from services.worker.async_stream import AsyncRequestStream
from services.worker.call_metadata import OUTPUTS_KEY
from services.worker.output_sinks import OutputSinks, SinkClosed
from services.worker.token_chunks import ChunkCursor, token_chunks
from tests.aio import run
from tests.conftest import random_prompts

pytestmark = pytest.mark.timeout(60)

PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


class Aborted(Exception):
    pass


class Context:
    """What relay and token_chunks read of a gRPC servicer context."""

    def __init__(self, sink_id: str | None):
        self._metadata = ((OUTPUTS_KEY, sink_id),) if sink_id else ()
        self.aborted: tuple | None = None

    def invocation_metadata(self):
        return self._metadata

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise Aborted(details)


@pytest.fixture(scope="module")
def engine_thread():
    et = EngineThread(build_engine("tiny", loaded=resolve_model("tiny"), block_size=8, num_blocks=256))
    yield et
    et.shutdown()
    assert et.engine.kv.num_used_blocks == 0


def reference(et: EngineThread, prompt: list[int]) -> list[int]:
    return list(et.submit(prompt, PARAMS).result().token_ids)


async def relay_all(et: EngineThread, sinks: OutputSinks, context: Context, prompt: list[int]):
    stream = et.submit(prompt, PARAMS, stream_cls=AsyncRequestStream.factory(asyncio.get_running_loop()))
    cursor = ChunkCursor(0, False)
    own = [c async for c in sinks.relay(token_chunks(stream, cursor, context), context, stream.request_id,
                                        stream, cursor)]
    return stream, own


@run
async def test_a_decoded_request_arrives_whole_and_in_order(engine_thread):
    prompt = random_prompts([30], 512, seed=3)[0]
    expected = reference(engine_thread, prompt)
    sinks = OutputSinks()
    sink = sinks.open("router-1")
    stream, own = await relay_all(engine_thread, sinks, Context("router-1"), prompt)
    muxed = await sink.take()
    assert len(own) == 1 and own[0].finished and own[0].muxed_chunks == len(muxed)
    chunks = muxed + own
    assert [t for c in chunks for t in c.token_ids] == expected
    assert [c.index for c in chunks] == [sum(len(x.token_ids) for x in chunks[:i]) for i in range(len(chunks))]
    assert all(c.request_id == stream.request_id for c in muxed)
    assert len(muxed) >= len(expected) // 2          # each step's token went to the sink as it came
    assert stream.divert is None and sink.users == 0
    assert (sinks.muxed_chunks, sinks.own_chunks) == (len(muxed), 1)


@run
async def test_without_a_sink_every_chunk_comes_on_the_stream(engine_thread):
    prompt = random_prompts([12], 512, seed=4)[0]
    sinks = OutputSinks()
    stream, own = await relay_all(engine_thread, sinks, Context(None), prompt)
    assert [t for c in own for t in c.token_ids] == reference(engine_thread, prompt)
    assert stream.divert is None and sinks.muxed_chunks == 0


def _output(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id=rid, new_token_ids=[token], new_text="", finished=finished)


@run
async def test_outputs_behind_queued_ones_keep_their_order():
    """An output that finds earlier ones still queued for the task is queued too, not diverted."""
    loop = asyncio.get_running_loop()
    stream = AsyncRequestStream(None, "q", loop=loop)
    diverted = []
    stream._put_now(_output("q", 1))                  # before the relay installed divert: queued
    stream.divert = lambda out: diverted.append(out.new_token_ids[0]) or True
    stream._put_now(_output("q", 2))                  # the queue is not empty: queued behind 1
    assert diverted == [] and [o.new_token_ids[0] for o in await stream.next_batch()] == [1, 2]
    stream._put_now(_output("q", 3))                  # empty queue: diverted
    stream._put_now(_output("q", 4, finished=True))   # the finished one always goes to the task
    assert diverted == [3] and [o.new_token_ids[0] for o in await stream.next_batch()] == [4]


@run
async def test_a_sink_that_closes_raises_sink_closed(engine_thread):
    """The relay tells its caller (which parks the request, or ends the call UNAVAILABLE)."""
    prompt = random_prompts([20], 512, seed=5)[0]
    sinks = OutputSinks()
    sink = sinks.open("router-2")
    context = Context("router-2")
    stream = engine_thread.submit(prompt, SamplingParams(max_tokens=200, ignore_eos=True),
                                  stream_cls=AsyncRequestStream.factory(asyncio.get_running_loop()))
    cursor = ChunkCursor(0, False)

    async def consume():
        return [c async for c in sinks.relay(token_chunks(stream, cursor, context), context, stream.request_id,
                                             stream, cursor)]
    task = asyncio.ensure_future(consume())
    while not await sink.take():
        pass
    sinks.close(sink)                                 # the router's Outputs stream ends
    with pytest.raises(SinkClosed, match="Outputs stream closed under it"):
        await task
    stream.cancel()
    assert context.aborted is None and stream.divert is None and sink.users == 0
