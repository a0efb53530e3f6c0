"""A request stream's engine outputs as TokenChunks: the one conversion both of its paths use.

A Decode or Generate stream's outputs reach the caller one of two ways (output_sinks.py): queued
to the stream's own task, which yields them on the request's gRPC stream, or, while a router's
Outputs stream carries them, converted on the event loop the moment the engine hands them over
(`AsyncRequestStream.divert`), with no task woken per token. `ChunkCursor` keeps what the
conversion needs across both: the next output index, whether logprobs are wanted, the index the
caller already has, and the first-decode timing.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import grpc

from services.engine.engine import RequestOutput
from services.engine.engine_thread import EngineDeadError
from services.engine.request import FinishReason
from services.proto_convert import outputs_to_chunk
from services.worker.async_stream import AsyncRequestStream
from tandem.v1 import worker_pb2


class ChunkCursor:
    """index: the output index the next chunk starts at; start_index: the caller has everything
    before it (chunks entirely below are dropped, a straddling one trimmed); first_decode_since: a
    time.monotonic() from which the first chunk's first_decode_s is measured (None: not stamped)."""

    def __init__(self, index: int, want_logprobs: bool, start_index: int = 0,
                 first_decode_since: float | None = None):
        self.index, self.want_logprobs, self.start_index = index, want_logprobs, start_index
        self._first_since = first_decode_since

    def chunk(self, outputs: list[RequestOutput], keep: bool = False) -> worker_pb2.TokenChunk | None:
        """The chunk of consecutive outputs; None when the caller has all of it already (never for a
        finished one or with keep)."""
        chunk = outputs_to_chunk(outputs, self.index, self.want_logprobs)
        self.index += len(chunk.token_ids)
        if self._first_since is not None:
            chunk.first_decode_s = time.monotonic() - self._first_since
            self._first_since = None
        if chunk.index + len(chunk.token_ids) <= self.start_index and not (chunk.finished or keep):
            return None
        return from_index(chunk, self.start_index)


def from_index(chunk: worker_pb2.TokenChunk, start: int) -> worker_pb2.TokenChunk:
    """Drop tokens below `start` (the caller already has them)."""
    skip = start - chunk.index
    if skip <= 0:
        return chunk
    del chunk.token_ids[:skip]
    if chunk.logprobs:
        del chunk.logprobs[:skip]
    if chunk.top_logprobs:
        del chunk.top_logprobs[:skip]
    chunk.index = start
    return chunk


async def token_chunks(stream: AsyncRequestStream, cursor: ChunkCursor, context,
                       moved: Callable | None = None) -> AsyncIterator[worker_pb2.TokenChunk]:
    """TokenChunks of an engine stream's queued outputs, until the finished one (or the one whose
    request migrated away: `moved(request_id)` says where to). Tokens the engine produced while
    the reader was busy come merged into one chunk."""
    while True:
        try:
            outputs = await stream.next_batch()
        except (ValueError, EngineDeadError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE if isinstance(e, EngineDeadError)
                                else grpc.StatusCode.ABORTED, str(e))
        if outputs[-1].finish_reason == FinishReason.HANDOFF:
            chunk = cursor.chunk(outputs, keep=True)
            where = moved(stream.request_id) if moved is not None else None
            if where is None:
                await context.abort(grpc.StatusCode.INTERNAL, f"request {stream.request_id!r} left this "
                                    f"instance without a recorded destination")
            chunk.finished = False
            chunk.migrated.CopyFrom(worker_pb2.Migrated(instance_id=where.instance_id, address=where.address,
                                                        next_index=cursor.index))
            yield chunk
            return
        chunk = cursor.chunk(outputs)
        if chunk is not None:
            yield chunk
        if outputs[-1].finished:
            return
