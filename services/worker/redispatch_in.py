"""A re-dispatched request arriving at this worker: its old instance died mid-stream.

The router (router/request/redispatch.py) sends Generate with WorkerRequest.output_token_ids = the tokens
the client already has. This instance (decode or colocated) adopts the request as a preempted one:
the engine recomputes the KV of prompt + output[:-1] like any recompute, then samples the token at
output index len(output) on. Sampling is keyed by (seed, output index) (services/engine/sampler.py),
so a seeded or greedy request goes on exactly as it would have on the instance that died; the
detokenizer replays the output first, so text deltas go on from where the client's text ends.
"""
from __future__ import annotations

import grpc

from services.engine.sampling_params import InvalidRequestError
from services.roles import Role, WorkerState
from services.worker.async_stream import AsyncRequestStream
from services.worker.submit_errors import REFUSALS, abort_refused
from tandem.v1 import worker_pb2


async def start_resumed(servicer, request: worker_pb2.WorkerRequest, context):
    """(engine stream, params) of a re-dispatched request now queued to recompute here; its
    stream's first token has output index len(request.output_token_ids).

    Aborts the RPC (nothing is held then): FAILED_PRECONDITION on a prefill instance, UNAVAILABLE
    while not serving (draining) or with a stopped engine, INVALID_ARGUMENT for a request that
    cannot go on (no id, ids out of the vocabulary, output already at max_tokens or the context),
    ALREADY_EXISTS for an id in use here."""
    if servicer.role not in (Role.DECODE, Role.COLOCATED):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"a re-dispatched request (output_token_ids set) "
                            f"needs a decode or colocated instance; this one is {servicer.role.name.lower()}")
    if servicer.state_fn() != WorkerState.SERVING:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"instance {servicer.instance_id} is {servicer.state_fn()} "
                            f"and takes no new requests; resume the request on another instance")
    rid = request.request_id
    output = list(request.output_token_ids)
    try:
        if not rid:
            raise InvalidRequestError("request_id", "is empty; a re-dispatched request keeps a unique id")
        prompt, params = servicer._request_fields(request)
        vocab = servicer.engine.config.model.vocab_size
        if min(output) < 0 or max(output) >= vocab:
            raise InvalidRequestError("output_token_ids", f"an id is outside the vocabulary [0, {vocab})")
        if len(output) >= params.max_tokens:
            raise InvalidRequestError("output_token_ids", f"{len(output)} tokens already reach max_tokens "
                                      f"{params.max_tokens}: the request is finished, nothing to resume")
        if len(prompt) + len(output) >= servicer.engine.config.max_model_len:
            raise InvalidRequestError("output_token_ids", "prompt + output fill the context: nothing to resume")
        stream = servicer.et.adopt(rid, prompt, output, params, request.priority,
                                   stream_cls=AsyncRequestStream.factory(servicer._loop()), recompute=True)
    except REFUSALS as e:
        await abort_refused(context, e)
    return stream, params
