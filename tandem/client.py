"""The Tandem client SDK: `Client` (blocking) and `AsyncClient` (`grpc.aio`) for a cluster's router.

    with Client("127.0.0.1:50051") as c:
        for chunk in c.generate(prompt="Hello", max_tokens=32):
            print(chunk.text, end="")
        r = c.complete(token_ids=[1, 2, 3], max_tokens=16, temperature=0.0, seed=7)

The two clients differ only in I/O. They share `build_generate_request` (keyword arguments →
GenerateRequest), `parse_generate_response` (GenerateResponse → Chunk), `_StreamCheck` (the
protocol check), `CompletionBuilder` (timed chunks → Completion) and `_retry_delay` (the retry
policy).

Contracts of both clients:
- `generate()` raises ValueError before any RPC unless exactly one of `prompt` and `token_ids` is
  given, and returns an iterator that yields one Chunk per server message as it arrives. Closing
  it early (break, close()/aclose(), garbage collection, cancelling the consuming task) cancels
  the RPC, so the server stops the request.
- `timeout` (else the client's) is one deadline for the whole call, retries included.
- UNAVAILABLE is retried up to `max_retries` times with exponential backoff from 50 ms, only
  while no chunk has been yielded; afterwards it raises UnavailableError.
- A stream whose indexes are not contiguous from 0, or which ends without a finished message,
  raises InternalError (and the RPC is cancelled).
- Every failed RPC raises the typed error of `tandem.errors` for its status.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc

from services.roles import role_label
from tandem.errors import InternalError, from_rpc_error
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2

MAX_MESSAGE_BYTES = 64 << 20
_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
_FINISH_REASONS = {serving_pb2.FINISH_REASON_STOP: "stop", serving_pb2.FINISH_REASON_LENGTH: "length",
                   serving_pb2.FINISH_REASON_ABORT: "abort"}


@dataclass(frozen=True)
class Chunk:
    """One server message: the tokens at output positions `index` .. `index + len(token_ids) - 1`."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str                                   # text delta for these tokens
    logprobs: list[float] | None = None         # one per token, when asked for
    top_logprobs: list[dict[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None            # "stop" | "length" | "abort" on the final chunk
    usage: dict | None = None                   # final chunk: prompt_tokens, completion_tokens, cached_prompt_tokens
    ttft_breakdown: dict | None = None          # final chunk: queue_s, prefill_s, transfer_s, first_decode_s, kv_bytes
    prefill_instance: str = ""                  # first chunk
    decode_instance: str = ""                   # first chunk


@dataclass(frozen=True)
class Completion:
    """A whole generation with its latencies measured on the client clock (seconds)."""
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    ttft_s: float | None                        # call start → first token; None when no token came
    tpot_s: float                               # (t_last - t_first) / (n - 1); 0.0 when n <= 1
    e2e_s: float                                # call start → final message
    itl_s: list[float]                          # n - 1 inter-token gaps, split evenly within a message
    usage: dict | None = None
    ttft_breakdown: dict | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prefill_instance: str = ""
    decode_instance: str = ""


def build_generate_request(prompt: str | None = None, token_ids: Sequence[int] | None = None,
                           max_tokens: int = 16, temperature: float | None = None,
                           top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                           stop: str | Sequence[str] | None = None,
                           stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                           logprobs: int | None = None, request_id: str | None = None,
                           priority: int = 0, ttft_slo_s: float | None = None,
                           tpot_slo_s: float | None = None,
                           expected_output_tokens: int = 0, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0, repetition_penalty: float | None = None,
                           logit_bias: dict[int, float] | None = None, min_p: float = 0.0,
                           min_tokens: int = 0, json_schema: dict | str | None = None, json_object: bool = False,
                           regex: str | None = None, choice: Sequence[str] | None = None,
                           grammar: str | None = None) -> serving_pb2.GenerateRequest:
    """The GenerateRequest for `generate()`'s arguments; None leaves an optional field unset.

    Raises ValueError unless exactly one of `prompt` and `token_ids` is given. Everything else is
    validated by the server (INVALID_ARGUMENT naming the field). expected_output_tokens: a hint of
    the output length (1..max_tokens; 0: none) for the router's output-length predictor.
    presence_penalty, frequency_penalty ([-2, 2]), repetition_penalty (> 0; None or 1: off),
    logit_bias ({token id: bias in [-100, 100]}), min_p ([0, 1]) and min_tokens: as in
    services/engine/sampling_params.py.

    Structured output, at most one of: json_schema (a schema dict or its JSON text), json_object
    (any JSON object), regex (the whole output matches it), choice (the output is one of these
    strings), grammar (a Lark grammar, llguidance's dialect). ValueError when more than one is given.
    """
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt and token_ids")
    structured = _structured(json_schema, json_object, regex, choice, grammar)
    params = serving_pb2.SamplingParams(
        max_tokens=max_tokens, top_k=top_k, ignore_eos=ignore_eos,
        stop=[stop] if isinstance(stop, str) else list(stop or ()), stop_token_ids=list(stop_token_ids or ()),
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=dict(logit_bias or {}),
        min_p=min_p, min_tokens=min_tokens)
    if structured is not None:
        params.structured_output.CopyFrom(structured)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed), ("logprobs", logprobs),
                        ("repetition_penalty", repetition_penalty)):
        if value is not None:
            setattr(params, name, value)
    request = serving_pb2.GenerateRequest(request_id=request_id or "", prompt=prompt or "",
                                          prompt_token_ids=list(token_ids or ()), params=params, priority=priority,
                                          expected_output_tokens=expected_output_tokens)
    if ttft_slo_s is not None or tpot_slo_s is not None:
        request.slo.CopyFrom(serving_pb2.SloTargets(ttft_s=ttft_slo_s or 0.0, tpot_s=tpot_slo_s or 0.0))
    return request


def _structured(json_schema, json_object: bool, regex, choice, grammar) -> serving_pb2.StructuredOutput | None:
    given = [name for name, v in (("json_schema", json_schema), ("json_object", json_object or None), ("regex", regex),
                                  ("choice", choice), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one structured-output constraint, got {', '.join(given)}")
    if json_schema is not None:
        spec = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return serving_pb2.StructuredOutput(kind=serving_pb2.STRUCTURED_KIND_JSON_SCHEMA, spec=spec)
    if json_object:
        return serving_pb2.StructuredOutput(kind=serving_pb2.STRUCTURED_KIND_JSON_OBJECT)
    if regex is not None:
        return serving_pb2.StructuredOutput(kind=serving_pb2.STRUCTURED_KIND_REGEX, spec=regex)
    if choice is not None:
        return serving_pb2.StructuredOutput(kind=serving_pb2.STRUCTURED_KIND_CHOICE, choices=list(choice))
    if grammar is not None:
        return serving_pb2.StructuredOutput(kind=serving_pb2.STRUCTURED_KIND_GRAMMAR, spec=grammar)
    return None


def parse_generate_response(msg: serving_pb2.GenerateResponse, request_id: str) -> Chunk:
    """The Chunk for one message; `request_id` stands in when the message leaves it empty."""
    return Chunk(
        request_id=msg.request_id or request_id, index=msg.index, token_ids=list(msg.token_ids), text=msg.text,
        logprobs=list(msg.logprobs) or None,
        top_logprobs=[dict(zip(t.token_ids, t.logprobs)) for t in msg.top_logprobs] or None,
        finished=msg.finished, finish_reason=_FINISH_REASONS.get(msg.finish_reason),
        usage=_fields(msg.usage) if msg.HasField("usage") else None,
        ttft_breakdown=_fields(msg.ttft_breakdown) if msg.HasField("ttft_breakdown") else None,
        prefill_instance=msg.prefill_instance, decode_instance=msg.decode_instance)


def _fields(msg) -> dict:
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def _instance(report: worker_pb2.LoadReport) -> dict:
    """A LoadReport as a dict: `id` for instance_id, `role` and `home_role` as "prefill" | "decode" |
    "colocated" (adaptive pools: an instance switched to serve both phases is "colocated" now and
    at home in its start role)."""
    fields = _fields(report)
    fields.pop("requests", None)          # only Stats(list_requests) fills it; never in a record
    fields["role"] = role_label(report.role, "unspecified")
    if report.home_role != worker_pb2.ROLE_UNSPECIFIED:
        fields["home_role"] = role_label(report.home_role, "unspecified")
    return {"id": fields.pop("instance_id"), **fields}


def _model(info: serving_pb2.ModelInfo) -> dict:
    return {"id": info.id, "max_model_len": info.max_model_len, "vocab_size": info.vocab_size}


class _StreamCheck:
    """The protocol of one Generate stream: indexes contiguous from 0, a finished message last."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.tokens = 0
        self.messages = 0
        self.finished = False

    def accept(self, msg: serving_pb2.GenerateResponse) -> Chunk:
        """The message's Chunk; InternalError when it breaks the protocol."""
        if self.finished:
            raise InternalError("message after the final one", request_id=self.request_id or None)
        if msg.index != self.tokens:
            raise InternalError(f"stream index {msg.index}, expected {self.tokens}",
                                request_id=self.request_id or None)
        chunk = parse_generate_response(msg, self.request_id)
        self.request_id = chunk.request_id
        self.tokens += len(chunk.token_ids)
        self.messages += 1
        self.finished = chunk.finished
        return chunk

    def end(self) -> None:
        """The stream closed with OK; InternalError unless its final message came."""
        if not self.finished:
            raise InternalError("stream ended without a finished message", request_id=self.request_id or None)


class CompletionBuilder:
    """Folds one stream's chunks into a Completion, timing them on the client clock.

    Create it just before the call starts, `add()` each chunk as it arrives, `build()` after the
    last one.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._arrivals: list[tuple[Chunk, float]] = []

    def add(self, chunk: Chunk) -> None:
        self._arrivals.append((chunk, time.perf_counter()))

    def build(self) -> Completion:
        chunks = [c for c, _ in self._arrivals]
        first = last = None
        itl: list[float] = []
        for chunk, t in self._arrivals:
            k = len(chunk.token_ids)
            if k == 0:
                continue
            if first is None:
                first = t
                itl.extend([0.0] * (k - 1))
            else:
                itl.extend([(t - last) / k] * k)
            last = t
        n = sum(len(c.token_ids) for c in chunks)
        final = chunks[-1] if chunks else Chunk("", 0, [], "")
        logprobs = [lp for c in chunks for lp in (c.logprobs or ())]
        top_logprobs = [tl for c in chunks for tl in (c.top_logprobs or ())]
        return Completion(
            request_id=final.request_id, token_ids=[t for c in chunks for t in c.token_ids],
            text="".join(c.text for c in chunks), finish_reason=final.finish_reason,
            ttft_s=None if first is None else first - self._start,
            tpot_s=(last - first) / (n - 1) if n > 1 else 0.0,
            e2e_s=(self._arrivals[-1][1] if self._arrivals else time.perf_counter()) - self._start,
            itl_s=itl, usage=final.usage, ttft_breakdown=final.ttft_breakdown,
            logprobs=logprobs or None, top_logprobs=top_logprobs or None,
            prefill_instance=next((c.prefill_instance for c in chunks if c.prefill_instance), ""),
            decode_instance=next((c.decode_instance for c in chunks if c.decode_instance), ""))


class _Deadline:
    """One deadline across the attempts of a call; None means none."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


def _retry_delay(error: grpc.RpcError, attempt: int, max_retries: int, deadline: _Deadline,
                 started: bool = False) -> float | None:
    """Seconds to wait before retrying failed attempt number `attempt` (from 0), or None to give up.

    Only UNAVAILABLE is retried, only before anything was yielded (`started`), at most
    `max_retries` times, and never when the wait would pass the deadline.
    """
    if error.code() != grpc.StatusCode.UNAVAILABLE or started or attempt >= max_retries:
        return None
    delay = min(_BACKOFF_S * 2 ** attempt, _MAX_BACKOFF_S)
    remaining = deadline.remaining()
    return None if remaining is not None and remaining <= delay else delay


def _credentials(tls) -> grpc.ChannelCredentials | None:
    """None for plaintext; `tls` is False, True (system roots), ChannelCredentials or a root-cert path."""
    if tls is False or tls is None:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    with open(tls, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


class _ClientBase:
    """Channel, stubs, auth metadata and defaults shared by both clients; `_grpc` picks the I/O."""

    _grpc = grpc

    def __init__(self, address: str, *, api_key: str | None = None,
                 tls: bool | grpc.ChannelCredentials | str = False, max_retries: int = 2,
                 timeout: float | None = None, options: Sequence[tuple[str, object]] = ()) -> None:
        channel_options = {"grpc.max_send_message_length": MAX_MESSAGE_BYTES,
                           "grpc.max_receive_message_length": MAX_MESSAGE_BYTES, **dict(options)}
        credentials = _credentials(tls)
        if credentials is None:
            self._channel = self._grpc.insecure_channel(address, options=list(channel_options.items()))
        else:
            self._channel = self._grpc.secure_channel(address, credentials, options=list(channel_options.items()))
        self._serving = serving_pb2_grpc.ServingStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._max_retries = max_retries
        self._timeout = timeout

    def _deadline(self, timeout: float | None) -> _Deadline:
        return _Deadline(self._timeout if timeout is None else timeout)


class Client(_ClientBase):
    """A blocking client. Thread-safe; `close()` (or leaving the `with` block) ends the channel.

    `Client(address, *, api_key=None, tls=False, max_retries=2, timeout=None, options=())`:
    `api_key` is sent as `authorization: Bearer <key>` on every call; `tls` is False, True, a
    `grpc.ChannelCredentials` or a root-certificate path; `timeout` is the default deadline of
    every call; `options` are extra gRPC channel options (messages up to 64 MiB by default).
    """

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the channel; calls in flight are cancelled. A second close is a no-op."""
        self._channel.close()

    def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                 timeout: float | None = None, **params) -> Iterator[Chunk]:
        """Stream the tokens of one request as they arrive.

        `params` are the keyword arguments of `build_generate_request` (max_tokens, temperature,
        top_p, top_k, seed, stop, stop_token_ids, ignore_eos, logprobs, request_id, priority,
        ttft_slo_s, tpot_slo_s, expected_output_tokens, the penalties, logit_bias, min_p, min_tokens and
        one structured-output constraint: json_schema, json_object, regex, choice or grammar). See the
        module docstring for cancellation, retries and errors.
        """
        request = build_generate_request(prompt, token_ids, **params)
        return self._stream(request, self._deadline(timeout))

    def _stream(self, request: serving_pb2.GenerateRequest, deadline: _Deadline) -> Iterator[Chunk]:
        check = _StreamCheck(request.request_id)
        for attempt in itertools.count():
            call = self._serving.Generate(request, timeout=deadline.remaining(), metadata=self._metadata)
            try:
                for msg in call:
                    yield check.accept(msg)
                check.end()
                return
            except grpc.RpcError as e:
                delay = _retry_delay(e, attempt, self._max_retries, deadline, started=check.messages > 0)
                if delay is None:
                    raise from_rpc_error(e, check.request_id or None) from e
            finally:
                call.cancel()
            time.sleep(delay)

    def complete(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                 timeout: float | None = None, **params) -> Completion:
        """Run one request to the end; the same arguments and errors as `generate()`."""
        builder = CompletionBuilder()
        for chunk in self.generate(prompt, token_ids, timeout=timeout, **params):
            builder.add(chunk)
        return builder.build()

    def abort(self, request_id: str) -> bool:
        """Stop a live request; False when the cluster does not know it (a safe no-op)."""
        return self._unary(self._serving.Abort, serving_pb2.AbortRequest(request_id=request_id)).found

    def list_models(self) -> list[dict]:
        """The served models: `id, max_model_len, vocab_size` each."""
        return [_model(m) for m in self._unary(self._serving.ListModels, serving_pb2.ListModelsRequest()).models]

    def list_instances(self) -> list[dict]:
        """Every instance's last LoadReport as a dict (`id`, `role` as a word, then its fields)."""
        reply = self._unary(self._admin.ListInstances, admin_pb2.ListInstancesRequest())
        return [_instance(r) for r in reply.instances]

    def migrate(self, request_id: str, to_instance_id: str, timeout: float | None = None) -> dict:
        """Move a running request to another decode instance; returns the outcome as a dict
        (`committed`, `abort_reason`, `stages`, `downtime_s`, ...) once it committed or aborted."""
        reply = self._unary(self._admin.Migrate, admin_pb2.AdminMigrateRequest(
            request_id=request_id, to_instance_id=to_instance_id), timeout)
        return _fields(reply)

    def drain(self, instance_id: str, *, wait: bool = False, timeout_s: float = 600.0, undo: bool = False) -> dict:
        """Put a decode instance in draining (its requests migrate away, it takes no new work);
        with wait, return once it is drained or timeout_s passed. undo: serve again. Returns
        `state` and `remaining` (requests still there)."""
        reply = self._unary(self._admin.Drain, admin_pb2.DrainRequest(
            instance_id=instance_id, wait=wait, timeout_s=timeout_s, undo=undo), timeout_s + 30 if wait else None)
        return {"state": reply.state, "remaining": reply.remaining}

    def _unary(self, method, request, timeout: float | None = None):
        deadline = self._deadline(timeout)
        for attempt in itertools.count():
            try:
                return method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = _retry_delay(e, attempt, self._max_retries, deadline)
                if delay is None:
                    raise from_rpc_error(e) from e
            time.sleep(delay)


class AsyncClient(_ClientBase):
    """The `grpc.aio` twin of `Client`, with the same arguments; create it inside a running loop.

    `async with AsyncClient(address) as c:` then `async for chunk in c.generate(...)`,
    `await c.complete(...)`, `await c.abort(...)`, `await c.list_models()`, `await c.list_instances()`.
    """

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """End the channel; calls in flight are cancelled. A second close is a no-op."""
        await self._channel.close()

    def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                 timeout: float | None = None, **params) -> AsyncIterator[Chunk]:
        """As `Client.generate`; `aclose()` or cancelling the consuming task cancels the RPC."""
        request = build_generate_request(prompt, token_ids, **params)
        return self._stream(request, self._deadline(timeout))

    async def _stream(self, request: serving_pb2.GenerateRequest, deadline: _Deadline) -> AsyncIterator[Chunk]:
        check = _StreamCheck(request.request_id)
        for attempt in itertools.count():
            call = self._serving.Generate(request, timeout=deadline.remaining(), metadata=self._metadata)
            try:
                async for msg in call:
                    yield check.accept(msg)
                check.end()
                return
            except grpc.RpcError as e:
                delay = _retry_delay(e, attempt, self._max_retries, deadline, started=check.messages > 0)
                if delay is None:
                    raise from_rpc_error(e, check.request_id or None) from e
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def complete(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                       timeout: float | None = None, **params) -> Completion:
        """As `Client.complete`."""
        builder = CompletionBuilder()
        async for chunk in self.generate(prompt, token_ids, timeout=timeout, **params):
            builder.add(chunk)
        return builder.build()

    async def abort(self, request_id: str) -> bool:
        """As `Client.abort`."""
        reply = await self._unary(self._serving.Abort, serving_pb2.AbortRequest(request_id=request_id))
        return reply.found

    async def list_models(self) -> list[dict]:
        """As `Client.list_models`."""
        reply = await self._unary(self._serving.ListModels, serving_pb2.ListModelsRequest())
        return [_model(m) for m in reply.models]

    async def list_instances(self) -> list[dict]:
        """As `Client.list_instances`."""
        reply = await self._unary(self._admin.ListInstances, admin_pb2.ListInstancesRequest())
        return [_instance(r) for r in reply.instances]

    async def migrate(self, request_id: str, to_instance_id: str, timeout: float | None = None) -> dict:
        """As `Client.migrate`."""
        reply = await self._unary(self._admin.Migrate, admin_pb2.AdminMigrateRequest(
            request_id=request_id, to_instance_id=to_instance_id), timeout)
        return _fields(reply)

    async def drain(self, instance_id: str, *, wait: bool = False, timeout_s: float = 600.0,
                    undo: bool = False) -> dict:
        """As `Client.drain`."""
        reply = await self._unary(self._admin.Drain, admin_pb2.DrainRequest(
            instance_id=instance_id, wait=wait, timeout_s=timeout_s, undo=undo), timeout_s + 30 if wait else None)
        return {"state": reply.state, "remaining": reply.remaining}

    async def _unary(self, method, request, timeout: float | None = None):
        deadline = self._deadline(timeout)
        for attempt in itertools.count():
            try:
                return await method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = _retry_delay(e, attempt, self._max_retries, deadline)
                if delay is None:
                    raise from_rpc_error(e) from e
            await asyncio.sleep(delay)
