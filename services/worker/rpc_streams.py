"""Token streams of a worker: Generate (a colocated instance's whole request, or one re-dispatched
with tokens delivered elsewhere) and the routers' Outputs streams. Generate and Decode stream through
the same helper, WorkerServicer._stream_out (chunking: token_chunks.py; a lost reader: parked.py).
"""
from __future__ import annotations

import contextlib
import logging
import time

import grpc

from services.roles import Role
from services.worker.async_stream import AsyncRequestStream
from services.worker.redispatch_in import start_resumed
from services.worker.submit_errors import REFUSALS, abort_refused
from services.worker.token_chunks import ChunkCursor
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.worker")


class StreamRpcs:
    """Generate and Outputs. A part of WorkerServicer (servicer.py)."""

    async def Generate(self, request: worker_pb2.WorkerRequest, context):
        if request.output_token_ids:       # re-dispatched after its instance died: recompute here, go on
            stream, params = await start_resumed(self, request, context)
            cursor = ChunkCursor(len(request.output_token_ids), params.logprobs is not None)
        else:
            arrival = time.monotonic()
            await self._require_role(context, Role.COLOCATED, what="Generate")
            try:
                prompt, params = self._request_fields(request)
                stream = self.et.submit(prompt, params, request.request_id or None, request.priority, handoff=False,
                                        stream_cls=AsyncRequestStream.factory(self._loop()), validated=True,
                                        predicted_output_tokens=request.predicted_output_tokens)
            except REFUSALS as e:
                await abort_refused(context, e)
            cursor = ChunkCursor(0, params.logprobs is not None, arrival=arrival)
        # The stream helper cancels the engine stream on every exit, or parks it when the reader is lost.
        async with contextlib.aclosing(self._stream_out(stream, cursor, context)) as chunks:
            async for chunk in chunks:
                yield chunk

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
