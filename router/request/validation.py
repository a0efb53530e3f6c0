"""Turns a client's GenerateRequest into a RoutedRequest, or an InvalidRequestError naming the field.

The one place a request is validated: workers trust what the router sends them and re-check only
what is cheap (services/worker/servicer.py, _request_fields).
"""
from __future__ import annotations

import asyncio
import time
import uuid

from router.request.choices import check_choices
from router.request.dispatch import RoutedRequest
from services.engine.config import ModelConfig
from services.engine.engine import validate_prompt
from services.engine.sampling_params import InvalidRequestError
from services.engine.tokenizer import Tokenizer
from services.proto_convert import sampling_params_from_proto
from tandem.v1 import serving_pb2, worker_pb2


async def build_request_async(req: serving_pb2.GenerateRequest, model: ModelConfig, tokenizer: Tokenizer,
                              timeout: float | None) -> RoutedRequest:
    """build_request, with a text prompt tokenized (and the request validated) on a worker thread,
    not on the event loop every stream shares. Arrival is now, before the tokenizer runs."""
    arrival = time.monotonic()
    if req.prompt:
        return await asyncio.to_thread(build_request, req, model, tokenizer, timeout, arrival)
    return build_request(req, model, tokenizer, timeout, arrival)


def build_request(req: serving_pb2.GenerateRequest, model: ModelConfig, tokenizer: Tokenizer,
                  timeout: float | None, arrival: float | None = None) -> RoutedRequest:
    if req.model and req.model != model.model_id:
        raise InvalidRequestError("model", f"unknown model {req.model!r}; this cluster serves {model.model_id!r} "
                                  "(see ListModels), or leave it empty")
    if req.prompt and req.prompt_token_ids:
        raise InvalidRequestError("prompt", "set exactly one of prompt and prompt_token_ids, not both")
    if not req.HasField("params"):
        raise InvalidRequestError("params.max_tokens", "is required; set params.max_tokens > 0")
    prompt_ids = tokenizer.encode(req.prompt) if req.prompt else list(req.prompt_token_ids)
    params = sampling_params_from_proto(req.params)
    check_choices(req.params)
    max_len = model.max_position_embeddings
    validate_prompt(prompt_ids, params, model.vocab_size, max_len, tokenizer=tokenizer)
    if len(prompt_ids) + params.max_tokens > max_len:
        raise InvalidRequestError(
            "params.max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
            f"context of {max_len}; lower max_tokens to at most {max_len - len(prompt_ids)}")
    if req.HasField("slo") and (req.slo.ttft_s < 0 or req.slo.tpot_s < 0):
        raise InvalidRequestError("slo", "ttft_s and tpot_s must be >= 0 (0 means no target)")
    if not 0 <= req.expected_output_tokens <= params.max_tokens:
        raise InvalidRequestError("expected_output_tokens", f"{req.expected_output_tokens} is not in [1, max_tokens "
                                  f"({params.max_tokens})]; give the output length you expect, or 0 for no hint")
    request_id = req.request_id or f"req-{uuid.uuid4().hex[:16]}"
    wr = worker_pb2.WorkerRequest(request_id=request_id, prompt_token_ids=prompt_ids, params=req.params,
                                  priority=req.priority)
    return RoutedRequest(request_id, prompt_ids, params, wr, arrival or time.monotonic(), timeout,
                         expected_output_tokens=req.expected_output_tokens, slo_ttft_s=req.slo.ttft_s)
