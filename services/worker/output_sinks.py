"""The worker's end of Outputs streams: one per router, carrying the tokens of all its requests.

Without it every token of every request is one gRPC message on its own stream: at batch 30 that
is 30 sends here and 30 receives on the router per engine step, and each wakes a thread that then
takes a core from the engine's two OpenMP threads (issue 15's profile: the serving path's ~0.2
cores slow the engine's steps ~1.5x on 2 cores). With it a step's chunks leave in one message.

    sink = sinks.open(router_id)            # the Outputs RPC, for as long as it lives
    async for chunk in sinks.relay(token_chunks(stream, cursor, context, moved), context, request_id,
                                   stream, cursor):
        yield chunk                          # only the stream's last chunk, when a sink takes the rest

A request stream picks its path once, at its start: through the caller's sink when the call
carried OUTPUTS_KEY naming an open one, else every chunk on its own stream, as before. Its last
chunk (finished, or migrated) always travels on its own stream and says in `muxed_chunks` how many
went through the sink, so the caller yields it after those. A sink that closes under a stream
raises SinkClosed from the relay: the chunks queued in it are lost with the router's stream, and the
caller decides what becomes of the request (the servicer parks it: parked.py).

Given the engine stream and its cursor, the relay also takes the stream's outputs straight from
the engine's hand-over on the event loop (`AsyncRequestStream.divert`) instead of waking the
stream's task for each: at batch 40 that is 40 task switches of the loop's thread per step less,
time during which that thread held the GIL the engine thread needed (py-spy, issue 15).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.worker.async_stream import AsyncRequestStream
from services.worker.call_metadata import OUTPUTS_KEY
from services.worker.token_chunks import ChunkCursor
from tandem.v1 import worker_pb2



class SinkClosed(Exception):
    """The router's Outputs stream a request stream sends through closed under it: no reader has its
    chunks any more. The message names the request and how many chunks went through the sink."""


class OutputSink:
    """Chunks for one Outputs stream; put() from the event loop's thread, take() in its handler."""

    def __init__(self, sink_id: str):
        self.sink_id = sink_id
        self.closed = False
        self.users = 0                  # request streams sending through it now
        self.draining = False           # the worker stops: end once no stream uses it
        self._chunks: list[worker_pb2.TokenChunk] = []
        self._ready = asyncio.Event()

    def put(self, chunk: worker_pb2.TokenChunk) -> None:
        self._chunks.append(chunk)
        self._ready.set()

    def drain(self) -> None:
        self.draining = True
        self._ready.set()

    def left(self) -> None:
        """A request stream stopped using the sink."""
        self.users -= 1
        if self.draining:
            self._ready.set()

    async def take(self) -> list[worker_pb2.TokenChunk]:
        """Wait for at least one chunk; return every chunk queued (in order). Returns [] once
        draining with nothing queued and no stream using it (the Outputs stream then ends)."""
        while not self._chunks:
            if self.draining and self.users == 0:
                return []
            self._ready.clear()
            await self._ready.wait()
        chunks, self._chunks = self._chunks, []
        return chunks


class OutputSinks:
    """The open sinks of a worker, by the id their router chose."""

    def __init__(self):
        self._sinks: dict[str, OutputSink] = {}
        self.muxed_chunks = 0           # chunks sent through a sink, since the worker started
        self.own_chunks = 0             # chunks sent on their request's own stream

    def __len__(self) -> int:
        return len(self._sinks)

    def open(self, sink_id: str) -> OutputSink:
        """Raises ValueError for an empty id or one that is open."""
        if not sink_id:
            raise ValueError("OutputsRequest.id is empty; send a unique id per router")
        if sink_id in self._sinks:
            raise ValueError(f"an Outputs stream with id {sink_id!r} is open already; send a unique id per router")
        sink = self._sinks[sink_id] = OutputSink(sink_id)
        return sink

    def drain(self) -> None:
        """The worker stops: each Outputs stream ends once its request streams have (module doc)."""
        for sink in self._sinks.values():
            sink.drain()

    def close(self, sink: OutputSink) -> None:
        sink.closed = True
        if self._sinks.get(sink.sink_id) is sink:
            del self._sinks[sink.sink_id]

    def for_call(self, context) -> OutputSink | None:
        """The open sink the call's metadata names, or None."""
        if not self._sinks:
            return None
        for key, value in context.invocation_metadata() or ():
            if key == OUTPUTS_KEY:
                return self._sinks.get(value)
        return None

    async def relay(self, chunks: AsyncIterator[worker_pb2.TokenChunk], context, request_id: str,
                    stream: AsyncRequestStream | None = None,
                    cursor: ChunkCursor | None = None) -> AsyncIterator[worker_pb2.TokenChunk]:
        """A request stream's chunks: those before its last go to the sink the call names (module
        doc), the rest are yielded for the request's own stream. Raises SinkClosed when the sink
        closes under it (the chunk in hand is not sent; a cursor keeping history has it). With the
        engine `stream` and the `cursor` that `chunks` reads it through (token_chunks.py), outputs
        the engine hands over while the sink is open are converted and put in the sink right there
        on the loop (`stream.divert`): the stream's task wakes only for its last chunk, an error, or
        outputs that arrived behind queued ones."""
        sink = self.for_call(context)
        if sink is None:
            async for chunk in chunks:
                self.own_chunks += 1
                yield chunk
            return
        muxed = 0

        def put(chunk: worker_pb2.TokenChunk) -> None:
            nonlocal muxed
            chunk.request_id = request_id
            sink.put(chunk)
            muxed += 1
            self.muxed_chunks += 1

        def divert(output) -> bool:
            if sink.closed:
                return False            # queued: the task finds the sink closed and ends the stream
            chunk = cursor.chunk([output])
            if chunk is not None:
                put(chunk)
            return True

        sink.users += 1
        if stream is not None:
            stream.divert = divert
        try:
            async for chunk in chunks:
                if chunk.finished or chunk.HasField("migrated"):
                    chunk.muxed_chunks = muxed
                    self.own_chunks += 1
                    yield chunk
                    continue
                if sink.closed:
                    raise SinkClosed(f"request {request_id!r}: the router's Outputs stream closed under it after "
                                     f"{muxed} chunks")
                put(chunk)
        finally:
            if stream is not None:
                stream.divert = None
            sink.left()
