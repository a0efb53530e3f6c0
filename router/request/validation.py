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
from services.engine.sampling_params import InvalidRequestError, check_request_id
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
    check_request_id(req.request_id)
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
    resume = _resume_tokens(req, params, model.vocab_size) if req.HasField("resume") else None
    request_id = req.request_id or f"req-{uuid.uuid4().hex[:16]}"
    wr = worker_pb2.WorkerRequest(request_id=request_id, prompt_token_ids=prompt_ids, params=req.params,
                                  priority=req.priority)
    return RoutedRequest(request_id, prompt_ids, params, wr, arrival or time.monotonic(), timeout,
                         expected_output_tokens=req.expected_output_tokens, slo_ttft_s=req.slo.ttft_s,
                         resume_token_ids=resume)


def _resume_tokens(req: serving_pb2.GenerateRequest, params, vocab_size: int) -> list[int]:
    """The delivered tokens of a resumed request (GenerateRequest.resume), checked: the request is
    found again by its id, one choice only, and something is left to generate."""
    delivered = list(req.resume.delivered_token_ids)
    if not req.request_id:
        raise InvalidRequestError("request_id", "is required with resume: send the id of the request being resumed")
    if req.params.n > 1 or req.params.best_of > 1:
        raise InvalidRequestError("resume", "resumes a single-choice request; n and best_of must be 1 "
                                  "(send the request again without resume)")
    if len(delivered) >= params.max_tokens:
        raise InvalidRequestError("resume.delivered_token_ids", f"holds {len(delivered)} tokens, not fewer than "
                                  f"max_tokens ({params.max_tokens}): nothing is left to generate")
    bad = next((t for t in delivered if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("resume.delivered_token_ids", f"token id {bad} is outside the vocabulary "
                                  f"[0, {vocab_size}); send the ids the stream delivered")
    return delivered
