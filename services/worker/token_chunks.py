"""A request stream's engine outputs as TokenChunks: the one conversion both of its paths use.

A Decode or Generate stream's outputs reach the caller one of two ways (output_sinks.py): queued
to the stream's own task, which yields them on the request's gRPC stream, or, while a router's
Outputs stream carries them, converted on the event loop the moment the engine hands them over
(`AsyncRequestStream.divert`), with no task woken per token. `ChunkCursor` keeps what the
conversion needs across both: the next output index, whether logprobs are wanted, the index the
caller already has, the first-decode timing and, where the worker may park the request when its
reader is lost (parked.py), every chunk produced, so that a later reader can be given them again.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable

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
    time.monotonic() from which the first chunk's first_decode_s is measured (None: not stamped);
    arrival: the time.monotonic() a whole request (Generate) arrived: its first chunk carries queue_s
    (arrival → its first scheduled step) and prefill_s (→ this token); None: not stamped.
    history: None, or (after keep_history()) every chunk made since, untrimmed, for replay()."""

    def __init__(self, index: int, want_logprobs: bool, start_index: int = 0,
                 first_decode_since: float | None = None, arrival: float | None = None):
        self.index, self.want_logprobs, self.start_index = index, want_logprobs, start_index
        self._first_since, self._arrival = first_decode_since, arrival
        self.history: list[worker_pb2.TokenChunk] | None = None
        self.kept_from = index             # history starts at this output index

    def keep_history(self) -> None:
        """Keep every chunk made from now on (a no-op when kept already)."""
        if self.history is None:
            self.history, self.kept_from = [], self.index

    def chunk(self, outputs: list[RequestOutput], keep: bool = False) -> worker_pb2.TokenChunk | None:
        """The chunk of consecutive outputs; None when the caller has all of it already (never for a
        finished one or with keep). A kept chunk is never the trimmed one handed out (from_index)."""
        chunk = outputs_to_chunk(outputs, self.index, self.want_logprobs)
        self.index += len(chunk.token_ids)
        if self._first_since is not None:
            chunk.first_decode_s = time.monotonic() - self._first_since
            self._first_since = None
        if self._arrival is not None and outputs:
            now, started = time.monotonic(), outputs[0].first_scheduled_time or self._arrival
            chunk.queue_s, chunk.prefill_s = max(0.0, started - self._arrival), max(0.0, now - started)
            self._arrival = None
        if self.history is not None:
            self.history.append(chunk)
        if chunk.index + len(chunk.token_ids) <= self.start_index and not (chunk.finished or keep):
            return None
        return from_index(chunk, self.start_index)

    def migrated(self, chunk: worker_pb2.TokenChunk, to: worker_pb2.Migrated) -> None:
        """Make `chunk`, the last one chunk() returned, say the request moved `to` (and its kept copy)."""
        for c in (chunk, self.history[-1]) if self.history else (chunk,):
            c.finished = False
            c.migrated.CopyFrom(to)

    @property
    def ended(self) -> bool:
        """The kept chunks end the stream (finished, or migrated away)."""
        return bool(self.history) and (self.history[-1].finished or self.history[-1].HasField("migrated"))

    def kept_at(self, start: int) -> bool:
        """Whether replay(start) can serve a reader: every token from output index `start` on was kept
        or is still to come."""
        return self.history is not None and start >= self.kept_from

    def replay(self, start: int) -> list[worker_pb2.TokenChunk]:
        """Copies of the kept chunks from output index `start` on, a straddling one trimmed, for a new
        reader (their per-reader fields cleared); the last one always when it ended the stream.
        `start` past what exists gives nothing (the chunks that reach it come later). Raises
        ValueError unless kept_at(start)."""
        if not self.kept_at(start):
            raise ValueError(f"start_index {start}: the tokens from there were not kept (kept from index "
                             f"{self.kept_from if self.history is not None else self.index})")
        out = []
        for i, kept in enumerate(self.history):
            last_of_stream = i == len(self.history) - 1 and self.ended
            if kept.index + len(kept.token_ids) <= start and not last_of_stream:
                continue
            copy = worker_pb2.TokenChunk()
            copy.CopyFrom(kept)
            for name in ("request_id", "muxed_chunks", "first_decode_s", "queue_s", "prefill_s"):
                copy.ClearField(name)
            out.append(from_index(copy, start))
        return out


def from_index(chunk: worker_pb2.TokenChunk, start: int) -> worker_pb2.TokenChunk:
    """`chunk` without its tokens below `start` (the caller already has them): `chunk` itself when
    it has none, else a trimmed copy, so that a chunk kept for replay stays whole."""
    skip = start - chunk.index
    if skip <= 0:
        return chunk
    trimmed = worker_pb2.TokenChunk()
    trimmed.CopyFrom(chunk)
    del trimmed.token_ids[:skip]
    if trimmed.logprobs:
        del trimmed.logprobs[:skip]
    if trimmed.top_logprobs:
        del trimmed.top_logprobs[:skip]
    trimmed.index = start
    return trimmed


async def token_chunks(stream: AsyncRequestStream, cursor: ChunkCursor, context,
                       moved: Callable | None = None,
                       replay: Iterable[worker_pb2.TokenChunk] = ()) -> AsyncIterator[worker_pb2.TokenChunk]:
    """TokenChunks of an engine stream's queued outputs, until the finished one (or the one whose
    request migrated away: `moved(request_id)` says where to). Tokens the engine produced while
    the reader was busy come merged into one chunk. `replay` (cursor.replay(), a parked request
    taken back) comes first; nothing more is read when the cursor's kept chunks ended the stream."""
    for chunk in replay:
        yield chunk
    if cursor.ended:
        return
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
            cursor.migrated(chunk, worker_pb2.Migrated(instance_id=where.instance_id, address=where.address,
                                                       next_index=cursor.index))
            yield chunk
            return
        chunk = cursor.chunk(outputs)
        if chunk is not None:
            yield chunk
        if outputs[-1].finished:
            return
