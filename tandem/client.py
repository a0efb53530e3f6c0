"""The Tandem client SDK: `Client` (blocking) and `AsyncClient` (`grpc.aio`) for a cluster's router.

    with Client("127.0.0.1:50051") as c:
        for chunk in c.generate(prompt="Hello", max_tokens=32):
            print(chunk.text, end="")
        r = c.complete(token_ids=[1, 2, 3], max_tokens=16, temperature=0.0, seed=7)

The two clients differ only in I/O. They share `build_generate_request` (keyword arguments →
GenerateRequest), `parse_generate_response` (GenerateResponse → Chunk), `_StreamCheck` (the
protocol check), `CompletionBuilder` (timed chunks → Completion), `_Routers` (the router replicas
and which one is current), `_Sends` (what each send of a Generate call carries and the wait
before it) and `_retry_delay` (whether to try again, and after how long).

Contracts of both clients:
- `address` names one router or several replicas of it: "h1:1,h2:2" or a list/tuple of
  addresses. Calls go to the current router; an UNAVAILABLE moves the client on to the next one
  (round-robin), where its retry or resume goes.
- `generate()` raises ValueError before any RPC unless exactly one of `prompt` and `token_ids` is
  given, and returns an iterator that yields one Chunk per server message as it arrives. Closing
  it early (break, close()/aclose(), garbage collection, cancelling the consuming task) cancels
  the RPC, so the server stops the request.
- `timeout` (else the client's) is one deadline for the whole call, retries and resumes included.
- UNAVAILABLE while no chunk has been yielded is retried, the same request on the next router, up
  to `max_retries` times. UNAVAILABLE after a chunk (the router died: its stream broke) resumes a
  resumable request (n and best_of 1): the same request, same request_id, goes to the next router
  with `resume.delivered_token_ids` = every token yielded so far, up to `max_resumes` times, and
  the stream carries on at the next index, so each token is yielded exactly once. Both wait 50 ms
  doubling to 1 s, and never past the deadline. Anything else (n > 1, the tries spent, the deadline
  too near) raises UnavailableError; an UNAVAILABLE after the finished message ends the stream as
  usual, since nothing is missing.
- A resumable request without a request_id gets `req-<16 hex digits>` from the SDK before its
  first send, so that a resend names the same request.
- A stream whose indexes are not contiguous from 0 (across resumes), or which ends without a
  finished message, raises InternalError (and the RPC is cancelled).
- Every failed RPC raises the typed error of `tandem.errors` for its status.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter

import grpc

from services.roles import role_label
from tandem.errors import InternalError, from_rpc_error
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2

MAX_MESSAGE_BYTES = 64 << 20
_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
# A restarted router on the same address is found again within ~2 s (gRPC's default backoff
# grows to 120 s); the caller's `options` override these.
_CHANNEL_OPTIONS = {"grpc.max_send_message_length": MAX_MESSAGE_BYTES,
                    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
                    "grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 2000}
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
    """The protocol of one Generate call: indexes contiguous from 0, a finished message last.

    One check spans every send of a call, so a resumed stream must start at the index after the
    last token accepted; `token_ids` are the tokens accepted so far, in order.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.messages = 0
        self.finished = False

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def accept(self, msg: serving_pb2.GenerateResponse) -> Chunk:
        """The message's Chunk; InternalError when it breaks the protocol."""
        if self.finished:
            raise InternalError("message after the final one", request_id=self.request_id or None)
        if msg.index != self.tokens:
            raise InternalError(f"stream index {msg.index}, expected {self.tokens}",
                                request_id=self.request_id or None)
        chunk = parse_generate_response(msg, self.request_id)
        self.request_id = chunk.request_id
        self.token_ids.extend(chunk.token_ids)
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


def _retry_delay(error: grpc.RpcError, attempt: int, limit: int, deadline: _Deadline) -> float | None:
    """Seconds to wait before trying again after failed try number `attempt` (from 0): 50 ms
    doubling to 1 s; None to give up. Only UNAVAILABLE is tried again, at most `limit` times, and
    never when the wait would reach the deadline.
    """
    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= limit:
        return None
    delay = min(_BACKOFF_S * 2 ** attempt, _MAX_BACKOFF_S)
    remaining = deadline.remaining()
    return None if remaining is not None and remaining <= delay else delay


def _resumable(request: serving_pb2.GenerateRequest) -> bool:
    """Whether a router can resume the request after the client lost its router: one choice only
    (n and best_of 0 or 1), as the router requires of `resume`."""
    return request.params.n <= 1 and request.params.best_of <= 1


def _assign_request_id(request: serving_pb2.GenerateRequest) -> None:
    """Give a resumable request without an id one, `req-<16 hex digits>` (the router's own form),
    so a resend names the request the first router started. A safe no-op otherwise."""
    if not request.request_id and _resumable(request):
        request.request_id = f"req-{secrets.token_hex(8)}"


class _Sends:
    """The sends of one Generate call: the protocol check over every chunk yielded so far, the
    request each send carries, and the wait before the next (the module docstring's contract).

    Before any chunk, a send is the request as given (max_retries of them after the first). After
    one, a resumable request is re-sent with `resume.delivered_token_ids` = the tokens yielded
    (max_resumes of them); the router streams from index len(delivered), which `check` expects.
    """

    def __init__(self, request: serving_pb2.GenerateRequest, max_retries: int, max_resumes: int,
                 deadline: _Deadline) -> None:
        _assign_request_id(request)
        self._request = request
        self._max_retries, self._max_resumes = max_retries, max_resumes
        self._retries = self._resumes = 0
        self._deadline = deadline
        self.check = _StreamCheck(request.request_id)

    def request(self) -> serving_pb2.GenerateRequest:
        """What the next send carries."""
        if self.check.messages == 0:
            return self._request
        resend = serving_pb2.GenerateRequest()
        resend.CopyFrom(self._request)
        resend.resume.SetInParent()            # present even when the chunks so far held no token
        resend.resume.delivered_token_ids.extend(self.check.token_ids)
        return resend

    def delay(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before the next send after `error` broke this one; None to give up."""
        if self.check.messages == 0:
            self._retries += 1
            return _retry_delay(error, self._retries - 1, self._max_retries, self._deadline)
        if not _resumable(self._request):
            return None                        # a router cannot carry n choices on
        self._resumes += 1
        return _retry_delay(error, self._resumes - 1, self._max_resumes, self._deadline)


def _addresses(address: str | Sequence[str]) -> list[str]:
    """The router addresses of `address`: one, several joined by commas, or a list/tuple of them.
    ValueError when it names none."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    addresses = [a.strip() for a in parts if a.strip()]
    if not addresses:
        raise ValueError(f"no router address in {address!r}")
    return addresses


def _channel_options(options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    """The SDK's channel options with the caller's merged over them (the caller's win)."""
    return list({**_CHANNEL_OPTIONS, **dict(options)}.items())


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


@dataclass(frozen=True)
class _Router:
    """One router replica: its channel and the stubs on it."""
    address: str
    channel: grpc.Channel | grpc.aio.Channel
    serving: serving_pb2_grpc.ServingStub
    admin: admin_pb2_grpc.AdminStub


class _Routers:
    """The router replicas of a client and which one is current; safe to share between threads."""

    def __init__(self, routers: list[_Router]) -> None:
        self.all = routers
        self._current = 0
        self._lock = threading.Lock()

    def current(self) -> tuple[int, _Router]:
        """The router calls go to now, with its position for `failed()`."""
        i = self._current
        return i, self.all[i]

    def failed(self, i: int) -> None:
        """Router `i` answered UNAVAILABLE: move on to the next one, unless another call already
        moved on from `i` (two calls failing on one router must not skip a healthy one)."""
        with self._lock:
            if self._current == i:
                self._current = (i + 1) % len(self.all)


class _ClientBase:
    """Channels, stubs, auth metadata and defaults shared by both clients; `_grpc` picks the I/O."""

    _grpc = grpc

    def __init__(self, address: str | Sequence[str], *, api_key: str | None = None,
                 tls: bool | grpc.ChannelCredentials | str = False, max_retries: int = 2, max_resumes: int = 8,
                 timeout: float | None = None, options: Sequence[tuple[str, object]] = ()) -> None:
        addresses = _addresses(address)
        channel_options = _channel_options(options)
        credentials = _credentials(tls)
        routers = []
        for a in addresses:
            if credentials is None:
                channel = self._grpc.insecure_channel(a, options=channel_options)
            else:
                channel = self._grpc.secure_channel(a, credentials, options=channel_options)
            routers.append(_Router(a, channel, serving_pb2_grpc.ServingStub(channel),
                                   admin_pb2_grpc.AdminStub(channel)))
        self._routers = _Routers(routers)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._max_retries = max_retries
        self._max_resumes = max_resumes
        self._timeout = timeout

    def _deadline(self, timeout: float | None) -> _Deadline:
        return _Deadline(self._timeout if timeout is None else timeout)


class Client(_ClientBase):
    """A blocking client. Thread-safe; `close()` (or leaving the `with` block) ends the channels.

    `Client(address, *, api_key=None, tls=False, max_retries=2, max_resumes=8, timeout=None, options=())`:
    `address` is one router or several replicas ("h1:1,h2:2" or a list), one channel each;
    `api_key` is sent as `authorization: Bearer <key>` on every call; `tls` is False, True, a
    `grpc.ChannelCredentials` or a root-certificate path; `max_retries` bounds the retries of
    UNAVAILABLE before a chunk, `max_resumes` the resumes after one; `timeout` is the default
    deadline of every call; `options` are extra gRPC channel options, over the SDK's (messages up
    to 64 MiB, reconnect backoff 100 ms to 2 s).
    """

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the channels; calls in flight are cancelled. A second close is a no-op."""
        for router in self._routers.all:
            router.channel.close()

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
        sends = _Sends(request, self._max_retries, self._max_resumes, deadline)
        while True:
            at, router = self._routers.current()
            call = router.serving.Generate(sends.request(), timeout=deadline.remaining(), metadata=self._metadata)
            try:
                for msg in call:
                    yield sends.check.accept(msg)
                sends.check.end()
                return
            except grpc.RpcError as e:
                if sends.check.finished:
                    return                     # broke after the final message: nothing is missing
                delay = sends.delay(e)
                if delay is None:
                    raise from_rpc_error(e, sends.check.request_id or None) from e
                self._routers.failed(at)       # only UNAVAILABLE is tried again
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
        return self._unary("serving.Abort", serving_pb2.AbortRequest(request_id=request_id)).found

    def list_models(self) -> list[dict]:
        """The served models: `id, max_model_len, vocab_size` each."""
        return [_model(m) for m in self._unary("serving.ListModels", serving_pb2.ListModelsRequest()).models]

    def list_instances(self) -> list[dict]:
        """Every instance's last LoadReport as a dict (`id`, `role` as a word, then its fields)."""
        reply = self._unary("admin.ListInstances", admin_pb2.ListInstancesRequest())
        return [_instance(r) for r in reply.instances]

    def migrate(self, request_id: str, to_instance_id: str, timeout: float | None = None) -> dict:
        """Move a running request to another decode instance; returns the outcome as a dict
        (`committed`, `abort_reason`, `stages`, `downtime_s`, ...) once it committed or aborted."""
        reply = self._unary("admin.Migrate", admin_pb2.AdminMigrateRequest(
            request_id=request_id, to_instance_id=to_instance_id), timeout)
        return _fields(reply)

    def drain(self, instance_id: str, *, wait: bool = False, timeout_s: float = 600.0, undo: bool = False) -> dict:
        """Put a decode instance in draining (its requests migrate away, it takes no new work);
        with wait, return once it is drained or timeout_s passed. undo: serve again. Returns
        `state` and `remaining` (requests still there)."""
        reply = self._unary("admin.Drain", admin_pb2.DrainRequest(
            instance_id=instance_id, wait=wait, timeout_s=timeout_s, undo=undo), timeout_s + 30 if wait else None)
        return {"state": reply.state, "remaining": reply.remaining}

    def _unary(self, method: str, request, timeout: float | None = None):
        """`method` ("serving.Abort", "admin.Drain", ...) on the current router, retried on the next."""
        deadline = self._deadline(timeout)
        for attempt in itertools.count():
            at, router = self._routers.current()
            try:
                return attrgetter(method)(router)(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = _retry_delay(e, attempt, self._max_retries, deadline)
                if delay is None:
                    raise from_rpc_error(e) from e
                self._routers.failed(at)       # only UNAVAILABLE is tried again
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
        """End the channels; calls in flight are cancelled. A second close is a no-op."""
        for router in self._routers.all:
            await router.channel.close()

    def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                 timeout: float | None = None, **params) -> AsyncIterator[Chunk]:
        """As `Client.generate`; `aclose()` or cancelling the consuming task cancels the RPC."""
        request = build_generate_request(prompt, token_ids, **params)
        return self._stream(request, self._deadline(timeout))

    async def _stream(self, request: serving_pb2.GenerateRequest, deadline: _Deadline) -> AsyncIterator[Chunk]:
        sends = _Sends(request, self._max_retries, self._max_resumes, deadline)
        while True:
            at, router = self._routers.current()
            call = router.serving.Generate(sends.request(), timeout=deadline.remaining(), metadata=self._metadata)
            try:
                async for msg in call:
                    yield sends.check.accept(msg)
                sends.check.end()
                return
            except grpc.RpcError as e:
                if sends.check.finished:
                    return                     # broke after the final message: nothing is missing
                delay = sends.delay(e)
                if delay is None:
                    raise from_rpc_error(e, sends.check.request_id or None) from e
                self._routers.failed(at)       # only UNAVAILABLE is tried again
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
        reply = await self._unary("serving.Abort", serving_pb2.AbortRequest(request_id=request_id))
        return reply.found

    async def list_models(self) -> list[dict]:
        """As `Client.list_models`."""
        reply = await self._unary("serving.ListModels", serving_pb2.ListModelsRequest())
        return [_model(m) for m in reply.models]

    async def list_instances(self) -> list[dict]:
        """As `Client.list_instances`."""
        reply = await self._unary("admin.ListInstances", admin_pb2.ListInstancesRequest())
        return [_instance(r) for r in reply.instances]

    async def migrate(self, request_id: str, to_instance_id: str, timeout: float | None = None) -> dict:
        """As `Client.migrate`."""
        reply = await self._unary("admin.Migrate", admin_pb2.AdminMigrateRequest(
            request_id=request_id, to_instance_id=to_instance_id), timeout)
        return _fields(reply)

    async def drain(self, instance_id: str, *, wait: bool = False, timeout_s: float = 600.0,
                    undo: bool = False) -> dict:
        """As `Client.drain`."""
        reply = await self._unary("admin.Drain", admin_pb2.DrainRequest(
            instance_id=instance_id, wait=wait, timeout_s=timeout_s, undo=undo), timeout_s + 30 if wait else None)
        return {"state": reply.state, "remaining": reply.remaining}

    async def _unary(self, method: str, request, timeout: float | None = None):
        """As `Client._unary`."""
        deadline = self._deadline(timeout)
        for attempt in itertools.count():
            at, router = self._routers.current()
            try:
                return await attrgetter(method)(router)(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = _retry_delay(e, attempt, self._max_retries, deadline)
                if delay is None:
                    raise from_rpc_error(e) from e
                self._routers.failed(at)       # only UNAVAILABLE is tried again
            await asyncio.sleep(delay)
