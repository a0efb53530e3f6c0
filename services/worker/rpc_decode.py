"""Decode-side RPCs of a worker: Reserve, Decode (reserve, wait for the KV, stream the tokens; or take
back a parked request, parked.py) and Recompute (adopt a reserved request by recomputing it when its
KV will not come).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import grpc

from services.roles import Role, WorkerState
from services.engine.engine_thread import EngineDeadError
from services.engine.sampling_params import InvalidRequestError
from services.worker.async_stream import AsyncRequestStream
from services.worker import metrics as worker_metrics
from services.worker.leases import Lease, LeaseNotFound, LeaseReleased, LeaseState
from services.worker.call_metadata import RESERVED_KEY
from services.worker.token_chunks import ChunkCursor
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.worker")


class DecodeRpcs:
    """Reserve, Decode, Recompute and the lease callbacks. A part of WorkerServicer (servicer.py)."""

    async def Reserve(self, request: worker_pb2.ReserveRequest, context):
        await self._require_role(context, Role.DECODE, Role.COLOCATED, what="Reserve")
        lease_ms = request.lease_ms or self.lease_ms
        lease = await self._reserve(request.request, lease_ms, context)
        return worker_pb2.ReserveResponse(handle=worker_pb2.KVHandle(
            instance_id=self.instance_id, transport=self.kv_transport,
            address=self.kv_address, request_id=lease.request_id, num_blocks=len(lease.block_ids),
            block_size=self.engine.kv.block_size, lease_deadline_unix_ms=int(time.time() * 1e3) + lease_ms))

    async def _reserve(self, req: worker_pb2.WorkerRequest, lease_ms: int, context) -> Lease:
        """Reserve blocks for req's prompt under a lease of lease_ms (Reserve; Decode with a request).
        A refusal aborts the RPC: UNAVAILABLE (not serving), INVALID_ARGUMENT, ALREADY_EXISTS,
        RESOURCE_EXHAUSTED (no room); except for ALREADY_EXISTS the receiver forgets the id, so a
        KV transfer that opened for it already is refused at once instead of waiting."""
        rid = req.request_id
        code = message = None
        if self.state_fn() != WorkerState.SERVING:
            code, message = grpc.StatusCode.UNAVAILABLE, (f"instance {self.instance_id} is {self.state_fn()} and "
                                                          f"takes no new requests; place the request on another instance")
        elif not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request.request_id: is empty; set a unique id")
        else:
            try:
                prompt, params = self._request_fields(req)
            except InvalidRequestError as e:
                code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        if code is None:
            # Shielded: if this RPC is cancelled mid-way, the reservation still lands in the lease
            # table and is released from there, instead of holding blocks nobody tracks.
            task = asyncio.ensure_future(self._reserve_tracked(rid, prompt, params, req.priority, lease_ms))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(self._release_if_reserved)
                raise
            except ValueError as e:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
            except EngineDeadError as e:
                code, message = grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}"
            except RuntimeError as e:
                code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later or on another instance"
                self.on_full()             # the router placed it from an older report of this instance
        if rid:
            self.receiver.forget(rid)       # non-blocking here: nothing of rid is being written
        await context.abort(code, message)

    async def _reserve_tracked(self, rid: str, prompt: list[int], params, priority: int, lease_ms: int) -> Lease:
        """Reserve blocks and register the lease (deadline armed, receiver expecting the KV)."""
        block_ids = await self._engine_call(lambda e: e.reserve(rid, len(prompt)))
        lease = Lease(rid, prompt, params, priority, block_ids, time.monotonic() + lease_ms / 1e3, self._loop())
        self.leases.add(lease)            # cannot clash: reserve() refused a live id already
        self.receiver.expect(rid, block_ids, self.leases.commit)
        return lease

    def _release_if_reserved(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            asyncio.ensure_future(self.leases.release(task.result().request_id, "the Reserve call was cancelled"))

    def _adopt(self, lease: Lease, meta: dict, recompute: bool):
        """Start decoding right away (the stream buffers tokens): on the receiver thread once the KV
        is complete, or (recompute=True) without KV: the engine recomputes prompt + first token."""
        logprob = meta.get("first_logprob")
        return self.et.adopt(lease.request_id, lease.prompt_token_ids, [int(meta["first_token_id"])], lease.params,
                             lease.priority, [float("nan") if logprob is None else float(logprob)],
                             stream_cls=AsyncRequestStream.factory(lease.loop), recompute=recompute)

    async def _release_lease(self, lease: Lease) -> None:
        rid = lease.request_id
        await asyncio.to_thread(self.receiver.forget, rid)        # no byte lands in these blocks after this
        try:
            await self._engine_call(lambda e: e.release(rid))
        except EngineDeadError:
            pass
        if lease.expired:
            worker_metrics.lease_expired(self.instance_id)
        log.info("released lease %s: %s", rid, lease.reason)

    async def Decode(self, request: worker_pb2.DecodeRequest, context):
        rid = request.request_id
        lease = self.leases.get(rid)
        if lease is None and not request.HasField("request") and rid in self.parked:
            async for chunk in self._resume_parked(rid, request.start_index, context):
                yield chunk
            return
        reserved_here = lease is None and request.HasField("request")
        if reserved_here:
            await self._require_role(context, Role.DECODE, Role.COLOCATED, what="Decode with a request")
            if request.request.request_id not in ("", rid):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request.request_id {request.request.request_id!r}"
                                    f" differs from request_id {rid!r}; send one id")
            req = worker_pb2.WorkerRequest()
            req.CopyFrom(request.request)
            req.request_id = rid
            lease = await self._reserve(req, request.lease_ms or self.lease_ms, context)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {rid!r} has no reservation here; Reserve first "
                                f"or send the request with Decode")
        stream = None
        try:
            if reserved_here:          # tells the router the blocks are held, long before any token
                await context.send_initial_metadata(((RESERVED_KEY, str(len(lease.block_ids))),))
            await lease.settled.wait()
            if lease.state != LeaseState.ADOPTED:
                code = grpc.StatusCode.DEADLINE_EXCEEDED if lease.expired else grpc.StatusCode.ABORTED
                await context.abort(code, f"request {rid!r}: {lease.reason}")
            claimed = self.leases.claim(rid)
            if claimed is None:
                await context.abort(grpc.StatusCode.ABORTED, f"request {rid!r} was already claimed or abandoned")
            stream = claimed.stream
            self._decoding.add(rid)

            cursor = ChunkCursor(len(claimed.output_token_ids), claimed.params.logprobs is not None,
                                 start_index=request.start_index, first_decode_since=claimed.committed_at)
            async with contextlib.aclosing(self._stream_out(stream, cursor, context)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            if stream is not None:                    # _stream_out cancelled or parked it
                self._decoding.discard(rid)
            elif lease.state == LeaseState.PENDING:     # cancelled while waiting for the KV
                await self.leases.release(rid, "the decode stream was cancelled")
            else:
                late = self.leases.claim(rid)         # adopted but we never read it
                if late is not None:
                    late.stream.cancel()

    async def _resume_parked(self, rid: str, start_index: int, context):
        """Decode without a request of a parked request (parked.py): the chunks it kept from
        start_index on (a start_index beyond them waits for the tokens), then the live ones, through
        the same stream helper, so that it is parked again if this reader is lost too. Aborts
        FAILED_PRECONDITION, leaving it parked, when tokens from start_index were not kept; NOT_FOUND
        when it stopped being parked in between."""
        entry = self.parked.get(rid)
        if entry is not None and not entry.cursor.kept_at(start_index):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"request {rid!r}: start_index {start_index} "
                                f"is below what this instance kept of it (from index {entry.cursor.kept_from})")
        entry = await self.parked.take(rid)
        if entry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {rid!r} has no reservation here and is no "
                                f"longer parked (taken, released or its grace ended)")
        cursor = entry.cursor
        replay = cursor.replay(start_index)
        cursor.start_index = start_index              # live chunks below it are dropped too
        async with contextlib.aclosing(self._stream_out(entry.stream, cursor, context, replay)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def Recompute(self, request: worker_pb2.RecomputeRequest, context):
        """The KV of a reserved request will not come (PrefillResponse.kv_fallback): decode it anyway,
        recomputing prompt + first token here. The waiting Decode stream then goes on from index 1.
        OK also when the request decodes already (a late KV commit adopted it first)."""
        await self._require_role(context, Role.DECODE, Role.COLOCATED, what="Recompute")
        rid = request.request_id
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is empty; pass the id given to Reserve")
        logprob = request.first_logprob
        meta = {"first_token_id": request.first_token_id, "first_logprob": None if math.isnan(logprob) else logprob}
        try:
            adopted = await asyncio.to_thread(self.leases.recompute, rid, meta)
        except LeaseNotFound as e:
            if rid in self._decoding:                 # a late KV commit won, and Decode claimed it
                return worker_pb2.RecomputeResponse()
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except LeaseReleased as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (ValueError, EngineDeadError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"request {rid!r}: could not start decoding: {e}")
        log.info("request %s: %s", rid, "adopted by recompute (its KV transfer failed)" if adopted
                 else "recompute asked, but its KV had committed already")
        return worker_pb2.RecomputeResponse()
