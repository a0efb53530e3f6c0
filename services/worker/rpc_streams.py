"""Token streams of a worker: Generate (a colocated instance's whole request, or one re-dispatched
with tokens delivered elsewhere) and the routers' Outputs streams. The chunking Decode shares
with Generate is token_chunks.py.
"""
from __future__ import annotations

import logging

import grpc

from services.roles import Role
from services.worker.async_stream import AsyncRequestStream
from services.worker.redispatch_in import start_resumed
from services.worker.submit_errors import REFUSALS, abort_refused
from services.worker.token_chunks import ChunkCursor, token_chunks
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.worker")


class StreamRpcs:
    """Generate and Outputs. A part of WorkerServicer (servicer.py)."""

    async def Generate(self, request: worker_pb2.WorkerRequest, context):
        if request.output_token_ids:       # re-dispatched after its instance died: recompute here, go on
            stream, params = await start_resumed(self, request, context)
            try:
                cursor = ChunkCursor(len(request.output_token_ids), params.logprobs is not None)
                chunks = token_chunks(stream, cursor, context, self.sources.moved_to)
                async for chunk in self.outputs.relay(chunks, context, stream.request_id, stream, cursor):
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
            cursor = ChunkCursor(0, params.logprobs is not None)
            chunks = token_chunks(stream, cursor, context, self.sources.moved_to)
            async for chunk in self.outputs.relay(chunks, context, stream.request_id, stream, cursor):
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
