"""Token streams of a worker: Generate (a colocated instance's whole request, or one re-dispatched
with tokens delivered elsewhere), the routers' Outputs streams, and the chunking that Decode
shares with Generate.
"""
from __future__ import annotations

import logging

import grpc

from services.roles import Role
from services.engine.engine_thread import EngineDeadError
from services.engine.request import FinishReason
from services.proto_convert import outputs_to_chunk
from services.worker.async_stream import AsyncRequestStream
from services.worker.redispatch_in import start_resumed
from services.worker.submit_errors import REFUSALS, abort_refused
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.worker")


class StreamRpcs:
    """Generate and Outputs. A part of WorkerServicer (servicer.py)."""

    async def Generate(self, request: worker_pb2.WorkerRequest, context):
        if request.output_token_ids:       # re-dispatched after its instance died: recompute here, go on
            stream, params = await start_resumed(self, request, context)
            try:
                chunks = token_chunks(stream, len(request.output_token_ids), params.logprobs is not None, context,
                                      self.sources.moved_to)
                async for chunk in self.outputs.relay(chunks, context, stream.request_id):
                    yield chunk
            finally:
                stream.cancel()
            return
        await self._require_role(context, Role.COLOCATED, what="Generate")
        try:
            prompt, params = self._request_fields(request)
            stream = self.et.submit(prompt, params, request.request_id or None, request.priority, handoff=False,
                                    stream_cls=AsyncRequestStream.factory(self._loop()), validated=True,
                                    predicted_output_tokens=request.predicted_output_tokens)
        except REFUSALS as e:
            await abort_refused(context, e)
        try:
            chunks = token_chunks(stream, 0, params.logprobs is not None, context, self.sources.moved_to)
            async for chunk in self.outputs.relay(chunks, context, stream.request_id):
                yield chunk
        finally:
            stream.cancel()

    async def Outputs(self, request: worker_pb2.OutputsRequest, context):
        try:
            sink = self.outputs.open(request.id)
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS if request.id else grpc.StatusCode.INVALID_ARGUMENT,
                                str(e))
        log.debug("Outputs stream %s opened", request.id)
        try:
            await context.send_initial_metadata(())     # open: the caller need not wait for a token to know
            while chunks := await sink.take():
                yield worker_pb2.OutputBatch(chunks=chunks)
        finally:
            self.outputs.close(sink)
            log.debug("Outputs stream %s closed", request.id)


async def token_chunks(stream: AsyncRequestStream, index: int, want_logprobs: bool, context, moved=None):
    """TokenChunks of an engine stream from output `index` on, until the finished one (or the one
    whose request migrated away: `moved(request_id)` says where to). Tokens the engine produced
    while the reader was busy come merged into one chunk."""
    while True:
        try:
            outputs = await stream.next_batch()
        except (ValueError, EngineDeadError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE if isinstance(e, EngineDeadError)
                                else grpc.StatusCode.ABORTED, str(e))
        chunk = outputs_to_chunk(outputs, index, want_logprobs)
        index += len(chunk.token_ids)
        if outputs[-1].finish_reason == FinishReason.HANDOFF:
            where = moved(stream.request_id) if moved is not None else None
            if where is None:
                await context.abort(grpc.StatusCode.INTERNAL, f"request {stream.request_id!r} left this "
                                    f"instance without a recorded destination")
            chunk.finished = False
            chunk.migrated.CopyFrom(worker_pb2.Migrated(instance_id=where.instance_id, address=where.address,
                                                        next_index=index))
            yield chunk
            return
        yield chunk
        if chunk.finished:
            return


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
