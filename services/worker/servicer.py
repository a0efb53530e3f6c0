"""The tandem.v1.Worker servicer: a thin asyncio layer over the engine thread, the lease table
and the KV transport. Every RPC maps user-fixable errors to INVALID_ARGUMENT naming the field,
and every exit path (finish, cancel, error, timeout) gives back what the request held.

A request's path (DESIGN "Request life"): the router starts Decode (with the request: this decode
instance reserves) and Prefill (with the decode instance's KV address) at the same time. Prefill
submits the prompt to the engine at once and opens the KV transfer beside it; its pushes wait in
the pusher until the transfer is open, and the decode instance's receiver holds the transfer's
frames until the reservation lands. Requests come validated by the router: workers re-check only
what is cheap and would crash the engine (ids out of the vocabulary, lengths, their own capacity).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import grpc

from services.roles import Role, WorkerState
from services.engine.engine_thread import EngineDeadError, EngineThread
from services.engine.request import FinishReason
from services.engine.sampling_params import InvalidRequestError
from services.proto_convert import (FINISH_TO_PROTO, outputs_to_chunk, sampling_params_from_proto,
                                    top_logprobs_to_proto)
from services.transport import KVHandshakeError, KVTransportError
from services.worker.async_stream import AsyncRequestStream
from services.worker.output_sinks import OutputSinks
from services.worker.kv_push import PrefillPusher
from services.worker import metrics as worker_metrics
from services.worker.leases import Lease, LeaseNotFound, LeaseReleased, LeaseState, LeaseTable
from services.worker.migration_in import MigrationRefused, MigrationTargets
from services.worker.migration_out import MigrationConfig, MigrationError, MigrationSources
from services.worker.redispatch_in import start_resumed
from services.worker_pool import WorkerPool
from tandem.v1 import serving_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("tandem.worker")
RESERVED_KEY = "tandem-reserved"       # Decode's initial metadata once it reserved: the block count


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine_thread: EngineThread, *, role: Role, sender, receiver, pusher: PrefillPusher | None,
                 lease_ms: int, transfer_timeout_s: float, report_fn, instance_id: str, kv_transport: str,
                 migration: MigrationConfig | None = None, watermark_blocks: int = 0,
                 state_fn: Callable[[], str] = lambda: WorkerState.SERVING, set_state_fn: Callable[[str], None] | None = None,
                 kv_address: str | None = None, on_role_change: Callable[[], None] = lambda: None,
                 on_full: Callable[[], None] = lambda: None):
        """kv_address: the data-plane address published to peers (KVHandle.address, migration
        stages); default the receiver's bound address. `role` is the home role; SetRole changes
        `self.role` (what new work is taken) and then calls on_role_change (publish the record)."""
        self.et, self.engine = engine_thread, engine_thread.engine
        self.role, self.sender, self.receiver, self.pusher = role, sender, receiver, pusher
        self.home_role, self.on_role_change = role, on_role_change
        self.mixed_prefill_tokens, self.role_switches = engine_thread.engine.scheduler.mixed_prefill_tokens, 0
        self.kv_address = kv_address or receiver.address
        self.lease_ms, self.transfer_timeout_s = lease_ms, transfer_timeout_s
        self.report_fn = report_fn
        self.instance_id, self.kv_transport = instance_id, kv_transport
        self.state_fn, self.set_state_fn = state_fn, set_state_fn
        self.on_full = on_full          # a reservation was refused for room: publish a fresh load report
        self.leases = LeaseTable(self._adopt, self._release_lease, receiver.forget)
        self._prefills: dict[str, AsyncRequestStream] = {}
        self._decoding: set[str] = set()      # requests whose Decode stream claimed their lease
        self.outputs = OutputSinks()          # routers' Outputs streams (output_sinks.py)
        migration = migration or MigrationConfig(transfer_timeout_s=transfer_timeout_s)
        self.peers = WorkerPool()          # channels to other workers (migration destinations)
        block_size = self.engine.kv.block_size
        self.sources = MigrationSources(engine_thread, sender, self.peers, instance_id, block_size=block_size,
                                        config=migration)
        self.sources.on_event = self._migration_event
        self.targets = MigrationTargets(engine_thread, receiver, self.leases, block_size=block_size,
                                        max_in_flight=migration.max_in_flight, watermark_blocks=watermark_blocks,
                                        is_open=lambda: self.state_fn() == WorkerState.SERVING)

    # ---- helpers --------------------------------------------------------------------------
    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def _engine_call(self, fn):
        """fn(engine) on the engine thread, between steps; its result (or exception) here. The
        engine thread settles the future itself: no worker thread in between. If the caller is
        cancelled, fn still runs."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.et.call_soon(fn, lambda ok, value: loop.call_soon_threadsafe(_settle, future, ok, value))
        return await future

    def _release_soon(self, rid: str) -> None:
        """Free what the engine still holds for rid (a handed-off prompt's blocks stay as prefix
        cache), without waiting: queued now, so it runs before anything sent later under the same
        id, but the caller's answer does not wait for the engine step to end. Failures are logged."""
        try:
            self.et.call_soon(lambda e: e.release(rid))
        except EngineDeadError:
            pass

    def _request_fields(self, req: worker_pb2.WorkerRequest):
        """(prompt ids, engine SamplingParams) of a request the router validated, checked again only
        cheaply (ids in range by min/max, lengths, this instance's capacity): a malformed one is
        refused instead of crashing the engine. Raises InvalidRequestError."""
        params = sampling_params_from_proto(req.params)
        prompt = list(req.prompt_token_ids)
        self.engine.validate(prompt, params, ints=True)
        return prompt, params

    async def _require_role(self, context, *roles: Role, what: str):
        if self.role not in roles:
            names = " or ".join(r.name.lower() for r in roles)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{what} needs a {names} instance; this one is {self.role.name.lower()}")

    # ---- decode side: Reserve, Decode ----------------------------------------------------------
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

            async def chunks():
                first = True
                async for chunk in _token_chunks(stream, len(claimed.output_token_ids),
                                                 claimed.params.logprobs is not None, context, self.sources.moved_to):
                    if first:
                        chunk.first_decode_s = time.monotonic() - claimed.committed_at
                        first = False
                    if (chunk.index + len(chunk.token_ids) > request.start_index or chunk.finished
                            or chunk.HasField("migrated")):
                        yield _from_index(chunk, request.start_index)
            async for chunk in self.outputs.relay(chunks(), context, rid):
                yield chunk
        finally:
            if stream is not None:
                self._decoding.discard(rid)
                stream.cancel()                       # no-op once finished
            elif lease.state == LeaseState.PENDING:     # cancelled while waiting for the KV
                await self.leases.release(rid, "the decode stream was cancelled")
            else:
                late = self.leases.claim(rid)         # adopted but we never read it
                if late is not None:
                    late.stream.cancel()

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

    # ---- prefill side ------------------------------------------------------------------------
    async def Prefill(self, request: worker_pb2.PrefillRequest, context):
        """Compute the prompt while pushing its KV to the destination, commit, return the first token.

        The prompt goes to the engine at once; the transfer opens beside it (the pusher holds the
        first layers' pushes until it is open). A transport failure (KVTransportError: the
        destination unreachable, a push or the commit failing) does not fail the RPC: the prefill
        runs to its first token anyway, the transfer is aborted, and the response says why in
        kv_fallback; the router then asks the destination to Recompute. A layout mismatch
        (KVHandshakeError) is FAILED_PRECONDITION: configs must agree. The prompt's blocks are freed
        after the answer left (see _release_soon).
        """
        if self.home_role != Role.PREFILL:      # a switched prefill instance (both) still prefills for others
            await self._require_role(context, Role.PREFILL, what="Prefill")
        req, dest = request.request, request.destination
        rid = req.request_id
        try:
            prompt, params = self._request_fields(req)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not dest.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "destination.address: is empty; give the decode "
                                "instance's KV data-plane address (its LoadReport.kv_address)")
        arrival = time.monotonic()
        transfer, fallback = None, ""         # fallback: why the KV will not reach the destination
        stream = None
        committed = False
        self.pusher.register(rid)             # pushes wait for the transfer (attach below)
        try:
            try:
                stream = self.et.submit(prompt, params, rid, req.priority, handoff=True,
                                        stream_cls=AsyncRequestStream.factory(self._loop()), validated=True,
                                        predicted_output_tokens=req.predicted_output_tokens)
            except (ValueError, EngineDeadError) as e:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS if isinstance(e, ValueError)
                                    else grpc.StatusCode.UNAVAILABLE, str(e))
            self._prefills[rid] = stream
            transfer, fallback = await self._open_transfer(rid, dest, context)
            outputs = []
            while not (outputs and outputs[-1].finished):
                try:
                    outputs += await stream.next_batch()
                except (ValueError, EngineDeadError) as e:
                    await context.abort(grpc.StatusCode.UNAVAILABLE if isinstance(e, EngineDeadError)
                                        else grpc.StatusCode.ALREADY_EXISTS, str(e))
            sampled = time.monotonic()
            out = outputs[-1]
            if out.finish_reason == FinishReason.ABORT:
                await context.abort(grpc.StatusCode.CANCELLED, f"request {rid!r} was aborted")
            resp = worker_pb2.PrefillResponse(
                first_token_id=out.token_ids[0], first_logprob=out.logprobs[0] if out.logprobs else math.nan,
                first_text="".join(o.new_text for o in outputs), num_cached_tokens=out.num_cached_tokens)
            if out.top_logprobs:
                resp.first_top_logprobs.CopyFrom(top_logprobs_to_proto(out.top_logprobs[0]))
            push_error = self.pusher.unregister(rid)
            if push_error and not fallback:
                fallback = f"KV push to decode instance {dest.instance_id} failed: {push_error}"
            if out.finish_reason == FinishReason.HANDOFF:
                if not fallback:
                    meta = {"first_token_id": out.token_ids[0],
                            "first_logprob": None if math.isnan(resp.first_logprob) else resp.first_logprob}
                    try:
                        stats = await asyncio.to_thread(transfer.commit, len(prompt), meta, self.transfer_timeout_s)
                        committed = True
                        resp.kv_bytes = stats.bytes
                    except KVTransportError as e:
                        fallback = f"KV commit to decode instance {dest.instance_id} failed: {e}"
                resp.transfer_s = time.monotonic() - sampled
                if fallback:
                    resp.kv_fallback = fallback
                    log.warning("request %s: %s; the decode instance will recompute it", rid, fallback)
            else:
                resp.finished = True
                resp.finish_reason = FINISH_TO_PROTO[out.finish_reason]
            started = out.first_scheduled_time or arrival
            resp.queue_s, resp.prefill_s = max(0.0, started - arrival), max(0.0, sampled - started)
            return resp
        finally:
            self.pusher.unregister(rid)
            self._prefills.pop(rid, None)
            if transfer is not None and not committed:
                transfer.abort(fallback or "prefill did not complete")
            if stream is not None:
                stream.cancel()
            self._release_soon(rid)        # blocks stay only as prefix cache; a no-op if still queued

    async def _open_transfer(self, rid: str, dest: worker_pb2.KVHandle, context):
        """(transfer or None, fallback reason) for the KV of rid, opened off the event loop while the
        engine computes; the pusher gets it (or the reason it could not open). A cancelled caller
        leaves the transfer aborted once it exists, so the sender forgets it."""
        opening = asyncio.ensure_future(asyncio.to_thread(self.sender.open, dest.request_id or rid, dest.address,
                                                          self.engine.runner.kv))
        try:
            transfer = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().abort("cancelled"))
            raise
        except KVHandshakeError as e:
            self.pusher.attach(rid, error=str(e))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except KVTransportError as e:       # prefill anyway: the destination recomputes
            fallback = f"cannot reach decode instance {dest.instance_id} at {dest.address}: {e}"
            self.pusher.attach(rid, error=fallback)
            return None, fallback
        self.pusher.attach(rid, transfer)
        return transfer, ""

    # ---- colocated ------------------------------------------------------------------------------
    async def Generate(self, request: worker_pb2.WorkerRequest, context):
        if request.output_token_ids:       # re-dispatched after its instance died: recompute here, go on
            stream, params = await start_resumed(self, request, context)
            try:
                async for chunk in self.outputs.relay(_token_chunks(stream, len(request.output_token_ids),
                                                                    params.logprobs is not None, context,
                                                                    self.sources.moved_to), context, stream.request_id):
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
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        try:
            async for chunk in self.outputs.relay(_token_chunks(stream, 0, params.logprobs is not None, context,
                                                                self.sources.moved_to), context, stream.request_id):
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

    # ---- both ---------------------------------------------------------------------------------
    async def Release(self, request: worker_pb2.ReleaseRequest, context):
        rid = request.request_id
        found = await self.leases.release(rid, "released by the router")
        lease = self.leases.claim(rid)
        if lease is not None:
            lease.stream.cancel()
            found = True
        stream = self._prefills.get(rid)
        if stream is not None:
            stream.cancel()
            found = True
        self.et.abort(rid)
        try:
            await self._engine_call(lambda e: e.release(rid))
        except EngineDeadError:
            pass
        found = await self.targets.cancel(rid, "released by the router") or found
        moved = self.sources.moved_to(rid)
        if moved is not None:               # it decodes elsewhere now: pass the Release on
            self.peers.release_later(moved.address, rid)
            found = True
        return worker_pb2.ReleaseResponse(found=found)

    # ---- live migration ----------------------------------------------------------------------
    def _migration_event(self, event: str, *, reason: str = "", downtime_s: float = 0.0, stages: int = 1) -> None:
        if event == "started":
            worker_metrics.migration_started(self.instance_id)
        elif event == "committed":
            worker_metrics.migration_committed(self.instance_id, downtime_s, stages)
        else:
            worker_metrics.migration_aborted(self.instance_id, reason)

    async def Migrate(self, request: worker_pb2.MigrateRequest, context):
        await self._require_role(context, Role.DECODE, Role.COLOCATED, what="Migrate")
        try:
            return await self.sources.migrate(request)
        except MigrationError as e:
            await context.abort(e.code, str(e))

    async def MigrationStage(self, request: worker_pb2.MigrationStageRequest, context):
        await self._require_role(context, Role.DECODE, Role.COLOCATED, what="MigrationStage")
        rid = request.request_id
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is empty")
        prompt = params = None
        if request.stage == 0:
            try:
                prompt, params = self._request_fields(request.request)
            except InvalidRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            blocks = await self.targets.stage(rid, request.stage, request.num_tokens, prompt=prompt, params=params,
                                              priority=request.request.priority,
                                              source_instance_id=request.source_instance_id,
                                              lease_ms=request.lease_ms or 10_000)
        except MigrationRefused as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        return worker_pb2.MigrationStageResponse(kv_address=self.kv_address, num_blocks=blocks)

    async def CancelMigration(self, request: worker_pb2.CancelMigrationRequest, context):
        found = await self.targets.cancel(request.request_id, request.reason or "cancelled by the source")
        return worker_pb2.ReleaseResponse(found=found)

    async def SetState(self, request: worker_pb2.SetStateRequest, context):
        if request.state not in (WorkerState.DRAINING, WorkerState.SERVING):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"state: {request.state!r} is not draining or serving")
        if request.state == WorkerState.DRAINING and self.home_role == Role.PREFILL:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "only decode and colocated instances drain "
                                "by migration; stop a prefill instance directly (its requests are short)")
        if self.set_state_fn is None or self.state_fn() not in (WorkerState.SERVING, WorkerState.DRAINING, WorkerState.DRAINED):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"instance is {self.state_fn()}")
        self.set_state_fn(WorkerState(request.state))
        return self.report_fn()

    async def SetRole(self, request: worker_pb2.SetRoleRequest, context):
        """Adaptive pools: serve `role` from now on (see worker.proto). The engine's role and step
        cap change in one engine call, then this servicer's role and the published record."""
        allowed = {Role.PREFILL: (Role.PREFILL, Role.COLOCATED), Role.DECODE: (Role.DECODE, Role.COLOCATED),
                   Role.COLOCATED: (Role.COLOCATED,)}[self.home_role]
        role = Role.from_proto(request.role)
        if role not in allowed:
            names = " or ".join(r.name.lower() for r in allowed)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role: a {self.home_role.name.lower()} instance "
                                f"switches to {names} only")
        if self.state_fn() != WorkerState.SERVING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"instance {self.instance_id} is "
                                f"{self.state_fn()}; roles change only while serving (undo the drain first)")
        cap = request.mixed_prefill_tokens
        try:
            await self._engine_call(lambda e: e.set_role(role, cap))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}")
        old, self.role, self.mixed_prefill_tokens = self.role, role, cap
        self.role_switches += 1
        log.info("role %s -> %s (home %s; prompt tokens per step beside decodes: %s): %s", old.name.lower(),
                 role.name.lower(), self.home_role.name.lower(), cap or "no cap", request.reason or "SetRole")
        self.on_role_change()
        return self.report_fn()

    async def Stats(self, request, context):
        report = self.report_fn()
        if request.list_requests:
            try:
                report.requests.extend(await self._engine_call(_running_requests))
            except EngineDeadError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}")
        if request.check_integrity:
            def check(engine):
                try:
                    engine.check_integrity()
                    return "", engine.kv.num_free_blocks
                except Exception as e:       # report, don't crash: this is a diagnostic
                    return str(e), engine.kv.num_free_blocks
            try:
                report.integrity_error, report.free_blocks = await self._engine_call(check)
            except EngineDeadError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}")
        return report


def _settle(future: asyncio.Future, ok: bool, value) -> None:
    if future.done():              # its awaiter was cancelled
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


async def _token_chunks(stream: AsyncRequestStream, index: int, want_logprobs: bool, context, moved=None):
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


def _running_requests(engine) -> list[worker_pb2.RunningRequest]:
    """What runs or waits on this engine (engine thread)."""
    s = engine.scheduler
    return [worker_pb2.RunningRequest(request_id=r.request_id, priority=r.priority, num_tokens=r.num_tokens,
                                      num_output_tokens=r.num_output_tokens,
                                      num_blocks=len(engine.kv.block_table(r.request_id)), running=r in s.running)
            for r in s.running + s.waiting]


def _from_index(chunk: worker_pb2.TokenChunk, start: int) -> worker_pb2.TokenChunk:
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
