"""Conversions between the tandem.v1 messages and the engine's types, shared by router and worker."""
from __future__ import annotations

import math

from services.engine.engine import RequestOutput
from services.engine.request import FinishReason
from services.engine.sampling_params import InvalidRequestError, SamplingParams, StructuredKind, StructuredOutput
from tandem.v1 import serving_pb2, worker_pb2

FINISH_TO_PROTO = {
    FinishReason.STOP: serving_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: serving_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: serving_pb2.FINISH_REASON_ABORT,
}


def sampling_params_from_proto(p: serving_pb2.SamplingParams) -> SamplingParams:
    """Build (not validate) engine SamplingParams; unset optional fields take the defaults."""
    if not math.isfinite(p.temperature if p.HasField("temperature") else 0.0):
        raise InvalidRequestError("params.temperature", "must be a finite number >= 0")
    if p.HasField("top_p") and not math.isfinite(p.top_p):
        raise InvalidRequestError("params.top_p", "must be in (0, 1]")
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        min_p=p.min_p,
        min_tokens=p.min_tokens,
        structured_output=structured_from_proto(p.structured_output) if p.HasField("structured_output") else None)


def structured_from_proto(s: serving_pb2.StructuredOutput) -> StructuredOutput | None:
    """None for kind UNSPECIFIED (unconstrained); InvalidRequestError for a kind this build does not know."""
    if s.kind == serving_pb2.STRUCTURED_KIND_UNSPECIFIED:
        return None
    try:
        kind = StructuredKind(s.kind)
    except ValueError:
        raise InvalidRequestError("params.structured_output.kind", f"unknown kind {s.kind}") from None
    return StructuredOutput(kind, s.spec, tuple(s.choices))


def structured_to_proto(so: StructuredOutput) -> serving_pb2.StructuredOutput:
    return serving_pb2.StructuredOutput(kind=int(so.kind), spec=so.spec, choices=list(so.choices))


def sampling_params_to_proto(sp: SamplingParams) -> serving_pb2.SamplingParams:
    """The inverse of sampling_params_from_proto (a migration sends a request's params with it)."""
    p = serving_pb2.SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                   top_k=sp.top_k, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids),
                                   ignore_eos=sp.ignore_eos, presence_penalty=sp.presence_penalty,
                                   frequency_penalty=sp.frequency_penalty, logit_bias=dict(sp.logit_bias),
                                   min_p=sp.min_p, min_tokens=sp.min_tokens)
    if sp.repetition_penalty != 1.0:
        p.repetition_penalty = sp.repetition_penalty
    if sp.seed is not None:
        p.seed = sp.seed
    if sp.logprobs is not None:
        p.logprobs = sp.logprobs
    if sp.structured_output is not None:
        p.structured_output.CopyFrom(structured_to_proto(sp.structured_output))
    return p


def top_logprobs_to_proto(top: list[tuple[int, float]]) -> serving_pb2.TopLogprobs:
    return serving_pb2.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])


def outputs_to_chunk(outputs: list[RequestOutput], index: int, want_logprobs: bool) -> worker_pb2.TokenChunk:
    """Merge consecutive engine deltas of one request into one TokenChunk starting at `index`."""
    chunk = worker_pb2.TokenChunk(index=index)
    for o in outputs:
        chunk.token_ids.extend(o.new_token_ids)
        chunk.text += o.new_text
        if want_logprobs:
            chunk.logprobs.extend(o.new_logprobs)
            chunk.top_logprobs.extend(top_logprobs_to_proto(t) for t in o.new_top_logprobs)
    last = outputs[-1]
    if last.finished:
        chunk.finished = True
        chunk.finish_reason = FINISH_TO_PROTO.get(last.finish_reason, serving_pb2.FINISH_REASON_UNSPECIFIED)
        chunk.num_prompt_tokens = last.num_prompt_tokens
        chunk.num_cached_tokens = last.num_cached_tokens
    return chunk
