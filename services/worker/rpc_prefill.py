"""The prefill-side RPC of a worker: Prefill computes the prompt while its KV streams to the decode
instance's reservation, and answers with the first token once every byte is acknowledged.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from services.roles import Role
from services.engine.engine_thread import EngineDeadError
from services.engine.request import FinishReason
from services.engine.sampling_params import InvalidRequestError
from services.proto_convert import FINISH_TO_PROTO, top_logprobs_to_proto
from services.transport import KVHandshakeError, KVTransportError
from services.worker.async_stream import AsyncRequestStream
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.worker")


class PrefillRpcs:
    """Prefill and the KV transfer it opens. A part of WorkerServicer (servicer.py)."""

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
