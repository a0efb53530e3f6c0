"""Client SDK against a real gRPC server with a scripted backend: streaming, timings, cancellation,
deadlines, retries, typed errors, the protocol check, auth metadata, several router replicas and
resuming a stream on another after its router died, and the async twin."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from tandem import (AsyncClient, Client, DeadlineExceededError, InternalError, InvalidArgumentError,
                    ResourceExhaustedError, TandemError, UnavailableError)
from tandem.client import Chunk, CompletionBuilder, _addresses, _channel_options, build_generate_request
from tandem.errors import from_rpc_error
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2

BOUND_S = 10.0     # upper bound when waiting for an event the server records; never a sleep


@dataclass
class ScriptedRouter(serving_pb2_grpc.ServingServicer, admin_pb2_grpc.AdminServicer):
    """Echoes the prompt back one output token per prompt token (text: one character per token,
    `chr(token_id)`), at most max_tokens, following the knobs below. Records what it saw.

    A request with `resume` streams from index len(delivered), after checking that the delivered
    tokens are the ones this echo sends (INVALID_ARGUMENT otherwise), as a router resuming it would.
    """
    delay_s: float = 0.0                       # before each message
    tokens_per_message: int = 1
    fail_first: list = field(default_factory=list)     # (code, details) for the next calls, then serve
    fail_after_tokens: tuple | None = None     # (n, code): abort once n tokens were sent
    fail_once_after: int | None = None         # abort the next stream UNAVAILABLE once it sent n tokens
                                               # (all of them: after its final message)
    index_gap_at: int | None = None            # message with this index claims index + 1
    omit_final: bool = False                   # end the stream OK without a finished message
    calls: int = 0
    requests: list = field(default_factory=list)
    metadata: list = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)   # a stream ended before its last message
    live: set = field(default_factory=set)
    server: grpc.Server | None = None          # set by serve(); stop(0) is the router dying

    def Generate(self, request, context):
        self.calls += 1
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.fail_first:
            context.abort(*self.fail_first.pop(0))
        rid = request.request_id or f"auto-{self.calls}"
        self.live.add(rid)
        gone = threading.Event()                   # the RPC ended: set by grpc, even mid-send
        context.add_callback(lambda: (gone.set(), sent_all or self.cancelled.set()))
        sent_all = False
        tokens = list(request.prompt_token_ids) or [ord(c) for c in request.prompt]
        tokens = tokens[:request.params.max_tokens]
        delivered = list(request.resume.delivered_token_ids)
        if delivered != tokens[:len(delivered)]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"resume.delivered_token_ids {delivered} were not sent")
        step = self.tokens_per_message
        for start in range(len(delivered), len(tokens), step):
            if self.delay_s and gone.wait(self.delay_s):
                return
            if self.fail_after_tokens and start >= self.fail_after_tokens[0]:
                context.abort(self.fail_after_tokens[1], "instance lost")
            if self.fail_once_after is not None and start >= self.fail_once_after:
                self.fail_once_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "router going away")
            ids = tokens[start:start + step]
            last = start + step >= len(tokens) and not self.omit_final
            msg = serving_pb2.GenerateResponse(
                request_id=rid, index=start + (start == self.index_gap_at), token_ids=ids,
                text="".join(chr(t) for t in ids), finished=last)
            if start == 0:
                msg.prefill_instance, msg.decode_instance = "p0", "d0"
            if last:
                msg.finish_reason = serving_pb2.FINISH_REASON_LENGTH
                msg.usage.CopyFrom(serving_pb2.Usage(prompt_tokens=len(tokens), completion_tokens=len(tokens)))
                msg.ttft_breakdown.CopyFrom(serving_pb2.TtftBreakdown(queue_s=0.001, prefill_s=0.002, kv_bytes=4096))
            yield msg
        sent_all = True
        self.live.discard(rid)
        if self.fail_once_after is not None and self.fail_once_after <= len(tokens):
            self.fail_once_after = None
            context.abort(grpc.StatusCode.UNAVAILABLE, "router going away")

    def Abort(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return serving_pb2.AbortResponse(found=request.request_id in self.live)

    def ListModels(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if self.fail_first:
            context.abort(*self.fail_first.pop(0))
        return serving_pb2.ListModelsResponse(models=[serving_pb2.ModelInfo(id="tiny", max_model_len=2048,
                                                                              vocab_size=32000)])

    def ListInstances(self, request, context):
        if self.fail_first:
            context.abort(*self.fail_first.pop(0))
        return admin_pb2.ListInstancesResponse(instances=[
            worker_pb2.LoadReport(instance_id="prefill-0", role=worker_pb2.ROLE_PREFILL, address="127.0.0.1:7001",
                                  kv_address="127.0.0.1:8001", state="serving", total_blocks=100, free_blocks=90,
                                  running=1, waiting=2, step_time_ms=3.5),
            worker_pb2.LoadReport(instance_id="decode-0", role=worker_pb2.ROLE_DECODE, address="127.0.0.1:7002",
                                  state="draining", total_blocks=200, free_blocks=150, reserved_blocks=10,
                                  running=4, waiting=0)])


@contextlib.contextmanager
def serve(router: ScriptedRouter):
    """A real gRPC server on a free local port → its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    serving_pb2_grpc.add_ServingServicer_to_server(router, server)
    admin_pb2_grpc.add_AdminServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    router.server = server
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.fixture
def router():
    return ScriptedRouter()


@pytest.fixture
def addr(router):
    with serve(router) as address:
        yield address


@pytest.fixture
def second():
    """A second router replica: (its ScriptedRouter, its address)."""
    other = ScriptedRouter()
    with serve(other) as address:
        yield other, address


# ---------------------------------------------------------------- streaming and completion
def test_generate_streams_contiguous_chunks(addr, router):
    with Client(addr) as c:
        chunks = list(c.generate(token_ids=[65, 66, 67, 68], max_tokens=3, request_id="r-1", seed=7,
                                 temperature=0.0, stop="zz", ttft_slo_s=0.5))
    assert [ch.index for ch in chunks] == [0, 1, 2]
    assert [ch.token_ids for ch in chunks] == [[65], [66], [67]]
    assert "".join(ch.text for ch in chunks) == "ABC"
    assert [ch.finished for ch in chunks] == [False, False, True]
    assert chunks[-1].finish_reason == "length" and chunks[0].finish_reason is None
    assert chunks[0].prefill_instance == "p0" and chunks[0].decode_instance == "d0"
    assert chunks[-1].usage == {"prompt_tokens": 3, "completion_tokens": 3, "cached_prompt_tokens": 0}
    assert chunks[-1].ttft_breakdown["kv_bytes"] == 4096 and chunks[0].usage is None
    assert all(ch.request_id == "r-1" for ch in chunks)
    sent = router.requests[0]
    assert sent.params.seed == 7 and sent.params.HasField("temperature") and not sent.params.HasField("top_p")
    assert list(sent.params.stop) == ["zz"] and sent.slo.ttft_s == pytest.approx(0.5)


def test_generate_needs_exactly_one_of_prompt_and_token_ids(addr, router):
    with Client(addr) as c:
        with pytest.raises(ValueError):
            c.generate()
        with pytest.raises(ValueError):
            c.generate(prompt="hi", token_ids=[1])
        with pytest.raises(ValueError):
            c.complete()
    assert router.calls == 0


def test_complete_timings_and_sdk_assigned_id(addr, router):
    router.delay_s = 0.01
    with Client(addr) as c:
        r = c.complete(prompt="Hello", max_tokens=16)
    assert r.text == "Hello" and r.token_ids == [ord(ch) for ch in "Hello"]
    assert r.finish_reason == "length" and re.fullmatch(r"req-[0-9a-f]{16}", r.request_id)
    assert router.requests[0].request_id == r.request_id         # assigned before the send
    assert 0 < r.ttft_s <= r.e2e_s
    assert len(r.itl_s) == 4 and all(gap > 0 for gap in r.itl_s)
    assert r.tpot_s > 0 and r.tpot_s == pytest.approx(sum(r.itl_s) / 4)
    assert r.usage["completion_tokens"] == 5 and r.ttft_breakdown["queue_s"] == pytest.approx(0.001)
    assert r.prefill_instance == "p0" and r.decode_instance == "d0"


def test_builder_splits_gaps_evenly_within_a_message():
    b = CompletionBuilder()
    b._start = 0.0                                    # arrivals on a hand-made clock
    b._arrivals = [(Chunk("r", 0, [1, 2], "ab"), 1.0), (Chunk("r", 2, [3, 4, 5], "cde"), 1.6),
                   (Chunk("r", 5, [], "", finished=True, finish_reason="stop"), 1.7)]
    r = b.build()
    assert r.itl_s == pytest.approx([0.0, 0.2, 0.2, 0.2])
    assert r.ttft_s == 1.0 and r.tpot_s == pytest.approx(0.6 / 4) and r.e2e_s == pytest.approx(1.7)
    assert r.text == "abcde" and r.finish_reason == "stop"
    one = CompletionBuilder()
    one.add(Chunk("r", 0, [9], "x", finished=True, finish_reason="length"))
    assert one.build().tpot_s == 0.0 and one.build().itl_s == []


def test_batched_messages_give_one_gap_per_token(addr, router):
    router.tokens_per_message = 3
    with Client(addr) as c:
        r = c.complete(token_ids=list(range(70, 77)), max_tokens=7)
    assert len(r.token_ids) == 7 and len(r.itl_s) == 6
    assert r.itl_s[:2] == [0.0, 0.0]                  # tokens that came with the first one


# ---------------------------------------------------------------- cancellation and deadlines
def test_breaking_out_cancels_the_rpc(addr, router):
    router.delay_s = 0.02
    with Client(addr) as c:
        for chunk in c.generate(token_ids=list(range(1000)), max_tokens=1000):
            if chunk.index == 2:
                break
        assert router.cancelled.wait(BOUND_S)


def test_closing_or_dropping_the_iterator_cancels_the_rpc(addr, router):
    router.delay_s = 0.02
    with Client(addr) as c:
        stream = c.generate(token_ids=list(range(1000)), max_tokens=1000)
        next(stream)
        stream.close()
        assert router.cancelled.wait(BOUND_S)
        router.cancelled.clear()
        stream = c.generate(token_ids=list(range(1000)), max_tokens=1000)
        next(stream)
        del stream
        gc.collect()
        assert router.cancelled.wait(BOUND_S)


def test_timeout_raises_deadline_exceeded(addr, router):
    router.delay_s = 0.05
    with Client(addr) as c:
        with pytest.raises(DeadlineExceededError) as info:
            c.complete(token_ids=list(range(1000)), max_tokens=1000, timeout=0.3, request_id="slow")
    assert info.value.request_id == "slow" and router.calls == 1


def test_client_default_timeout_applies(addr, router):
    router.delay_s = 0.05
    with Client(addr, timeout=0.3) as c:
        with pytest.raises(DeadlineExceededError):
            c.complete(token_ids=list(range(1000)), max_tokens=1000)


# ---------------------------------------------------------------- retries and errors
def test_unavailable_before_first_token_is_retried(addr, router):
    router.fail_first = [(grpc.StatusCode.UNAVAILABLE, "no decode instance")] * 2
    with Client(addr, max_retries=2) as c:
        r = c.complete(token_ids=[65, 66], max_tokens=2)
    assert r.text == "AB" and router.calls == 3


def test_unavailable_retries_are_bounded(addr, router):
    router.fail_first = [(grpc.StatusCode.UNAVAILABLE, "no decode instance")] * 3
    with Client(addr, max_retries=1) as c:
        with pytest.raises(UnavailableError) as info:
            c.complete(token_ids=[65], max_tokens=1)
    assert info.value.details == "no decode instance" and router.calls == 2


def test_unavailable_after_a_token_is_not_retried_without_resumes(addr, router):
    router.fail_after_tokens = (1, grpc.StatusCode.UNAVAILABLE)
    seen = []
    with Client(addr, max_retries=5, max_resumes=0) as c:
        with pytest.raises(UnavailableError):
            for chunk in c.generate(token_ids=[65, 66, 67], max_tokens=3):
                seen.append(chunk.index)
    assert seen == [0] and router.calls == 1


def test_invalid_argument_is_typed_and_not_retried(addr, router):
    router.fail_first = [(grpc.StatusCode.INVALID_ARGUMENT, "params.max_tokens must be > 0")]
    with Client(addr) as c:
        with pytest.raises(InvalidArgumentError) as info:
            c.complete(prompt="x", max_tokens=0, request_id="bad")
    e = info.value
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.details == "params.max_tokens must be > 0"
    assert e.request_id == "bad" and router.calls == 1


def test_other_statuses_map_to_their_classes(addr, router):
    router.fail_first = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"), (grpc.StatusCode.PERMISSION_DENIED, "no")]
    with Client(addr) as c:
        with pytest.raises(ResourceExhaustedError):
            c.complete(prompt="x")
        with pytest.raises(TandemError) as info:
            c.complete(prompt="x")
    assert type(info.value) is TandemError and info.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_from_rpc_error_without_a_status():
    e = from_rpc_error(grpc.RpcError("boom"))
    assert type(e) is TandemError and e.code == grpc.StatusCode.UNKNOWN and e.details == "boom"


def test_index_gap_raises_internal_and_cancels(addr, router):
    router.delay_s = 0.02
    router.index_gap_at = 1
    with Client(addr) as c:
        stream = c.generate(token_ids=list(range(1000)), max_tokens=1000)
        assert next(stream).index == 0
        with pytest.raises(InternalError, match="index 2, expected 1"):
            next(stream)
    assert router.cancelled.wait(BOUND_S)


def test_stream_without_final_message_raises_internal(addr, router):
    router.omit_final = True
    with Client(addr) as c:
        with pytest.raises(InternalError, match="without a finished message"):
            c.complete(token_ids=[65, 66], max_tokens=2)


# ---------------------------------------------------------------- router replicas and resuming
PROMPT = list(range(65, 75))                           # "ABCDEFGHIJ", echoed back
BOTH = pytest.mark.parametrize("kind", ["sync", "async"])
REQUEST_ID = re.compile(r"req-[0-9a-f]{16}")


def generate_all(kind: str, address, *, client: dict | None = None, request=None, **params) -> list[Chunk]:
    """Every chunk of one call through Client ("sync") or AsyncClient ("async"): generate(**params),
    or the hand-built `request` (for fields generate() has no keyword for, such as n)."""
    if kind == "sync":
        with Client(address, **(client or {})) as c:
            return list(c.generate(**params) if request is None else c._stream(request, c._deadline(None)))

    async def main():
        async with AsyncClient(address, **(client or {})) as c:
            stream = c.generate(**params) if request is None else c._stream(request, c._deadline(None))
            return [ch async for ch in stream]

    return asyncio.run(main())


@BOTH
def test_a_stream_broken_by_unavailable_resumes_on_the_next_router(kind, addr, router, second):
    other, other_addr = second
    router.fail_once_after = 4
    chunks = generate_all(kind, [addr, other_addr], token_ids=PROMPT, max_tokens=10)
    assert [t for ch in chunks for t in ch.token_ids] == PROMPT            # each token once, in order
    assert [ch.index for ch in chunks] == list(range(10))
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert (router.calls, other.calls) == (1, 1)
    first, resent = router.requests[0], other.requests[0]
    assert not first.HasField("resume") and list(resent.resume.delivered_token_ids) == PROMPT[:4]
    assert REQUEST_ID.fullmatch(first.request_id) and resent.request_id == first.request_id
    assert all(ch.request_id == first.request_id for ch in chunks)
    assert resent.prompt_token_ids == first.prompt_token_ids and resent.params == first.params


def test_complete_after_a_resume_holds_every_token_once(addr, router, second):
    other, other_addr = second
    router.tokens_per_message = other.tokens_per_message = 3
    router.fail_once_after = 4                         # breaks after the message holding 3..5
    with Client(f"{addr},{other_addr}") as c:
        r = c.complete(token_ids=PROMPT, max_tokens=10, request_id="mine")
    assert r.token_ids == PROMPT and r.text == "ABCDEFGHIJ" and len(r.itl_s) == 9
    assert r.finish_reason == "length" and r.request_id == "mine"
    assert other.requests[0].request_id == "mine"      # the caller's id is kept
    assert list(other.requests[0].resume.delivered_token_ids) == PROMPT[:6]


def test_a_router_killed_mid_stream_is_resumed_on_another(second):
    other, other_addr = second
    dying = ScriptedRouter(delay_s=0.01)
    with serve(dying) as dying_addr, Client([dying_addr, other_addr]) as c:
        stream = c.generate(token_ids=PROMPT, max_tokens=10)
        chunks = [next(stream) for _ in range(3)]
        dying.server.stop(0)                           # what grpc gives then is the router's death
        chunks += list(stream)
    assert [t for ch in chunks for t in ch.token_ids] == PROMPT
    assert [ch.index for ch in chunks] == list(range(10))
    delivered = list(other.requests[0].resume.delivered_token_ids)
    assert len(delivered) >= 3 and delivered == PROMPT[:len(delivered)] and other.calls == 1


def test_a_resume_on_the_same_router_and_resumes_are_bounded(addr, router):
    router.fail_once_after = 2
    with Client(addr) as c:
        assert c.complete(token_ids=PROMPT, max_tokens=10).token_ids == PROMPT
        assert list(router.requests[1].resume.delivered_token_ids) == PROMPT[:2]
    router.fail_after_tokens = (1, grpc.StatusCode.UNAVAILABLE)
    with Client(addr, max_resumes=2) as c, pytest.raises(UnavailableError):
        c.complete(token_ids=PROMPT, max_tokens=10)
    assert router.calls == 2 + 3                       # the first send and two resumes


@BOTH
def test_max_resumes_zero_raises_unavailable(kind, addr, router, second):
    other, other_addr = second
    router.fail_once_after = 2
    with pytest.raises(UnavailableError) as info:
        generate_all(kind, [addr, other_addr], client={"max_resumes": 0}, token_ids=PROMPT, max_tokens=10)
    assert other.calls == 0 and REQUEST_ID.fullmatch(info.value.request_id)


@BOTH
@pytest.mark.parametrize("choices", [{"n": 2}, {"best_of": 2}])
def test_several_choices_are_not_resumed(kind, choices, addr, router, second):
    other, other_addr = second
    router.fail_once_after = 2
    request = build_generate_request(token_ids=PROMPT, max_tokens=10)
    for name, value in choices.items():
        setattr(request.params, name, value)
    with pytest.raises(UnavailableError):
        generate_all(kind, [addr, other_addr], request=request)
    assert (router.calls, other.calls) == (1, 0)
    assert router.requests[0].request_id == ""         # not resumable: the SDK assigns no id


def test_unavailable_after_the_final_message_ends_the_stream(addr, router, second):
    other, other_addr = second
    router.fail_once_after = 3
    with Client([addr, other_addr]) as c:
        r = c.complete(token_ids=[65, 66, 67], max_tokens=3)
    assert r.text == "ABC" and r.finish_reason == "length" and other.calls == 0


def test_retries_and_unary_calls_move_on_round_robin(addr, router, second):
    other, other_addr = second
    router.fail_first = [(grpc.StatusCode.UNAVAILABLE, "restarting")]
    with Client(f"{addr}, {other_addr}") as c:
        assert c.complete(token_ids=[65, 66], max_tokens=2).text == "AB"
        assert (router.calls, other.calls) == (1, 1)
        assert not other.requests[0].HasField("resume")          # nothing yielded: a plain retry
        assert other.requests[0].request_id == router.requests[0].request_id
        c.complete(token_ids=[65], max_tokens=1)                 # the second router is current now
        assert (router.calls, other.calls) == (1, 2)
        other.fail_first = [(grpc.StatusCode.UNAVAILABLE, "restarting")]
        assert c.list_models()[0]["id"] == "tiny"                # a unary retry wraps round to the first
        c.complete(token_ids=[65], max_tokens=1)
    assert (router.calls, other.calls) == (2, 2)


def test_async_retries_move_on_to_the_next_router(addr, router, second):
    other, other_addr = second

    async def main():
        async with AsyncClient((addr, other_addr)) as c:
            router.fail_first = [(grpc.StatusCode.UNAVAILABLE, "restarting")]
            text = (await c.complete(token_ids=[65], max_tokens=1)).text
            other.fail_first = [(grpc.StatusCode.UNAVAILABLE, "restarting")]
            return text, await c.list_instances()

    text, instances = asyncio.run(main())
    assert text == "A" and (router.calls, other.calls) == (1, 1) and instances[0]["id"] == "prefill-0"


def test_addresses_and_channel_options():
    assert _addresses("h1:1, h2:2,") == ["h1:1", "h2:2"] and _addresses("h1:1") == ["h1:1"]
    assert _addresses(["h1:1", "h2:2"]) == _addresses(("h1:1", "h2:2")) == ["h1:1", "h2:2"]
    with pytest.raises(ValueError):
        _addresses(" , ")
    with pytest.raises(ValueError):
        Client([])
    options = dict(_channel_options([("grpc.max_reconnect_backoff_ms", 500), ("grpc.enable_retries", 0)]))
    assert options["grpc.max_reconnect_backoff_ms"] == 500 and options["grpc.enable_retries"] == 0   # the caller's win
    assert options["grpc.initial_reconnect_backoff_ms"] == 100
    assert options["grpc.max_receive_message_length"] == 64 << 20
    assert dict(_channel_options(()))["grpc.max_reconnect_backoff_ms"] == 2000


# ---------------------------------------------------------------- unary calls and auth
def test_abort_models_instances_and_api_key(addr, router):
    router.delay_s = 0.02
    with Client(addr, api_key="sekret") as c:
        stream = c.generate(token_ids=list(range(1000)), max_tokens=1000, request_id="live-1")
        next(stream)
        assert c.abort("live-1") is True
        assert c.abort("nope") is False
        stream.close()
        assert c.list_models() == [{"id": "tiny", "max_model_len": 2048, "vocab_size": 32000}]
        instances = c.list_instances()
    assert all(m.get("authorization") == "Bearer sekret" for m in router.metadata) and len(router.metadata) == 4
    assert [i["id"] for i in instances] == ["prefill-0", "decode-0"]
    assert [i["role"] for i in instances] == ["prefill", "decode"]
    first = instances[0]
    assert {"id", "role", "address", "state", "free_blocks", "total_blocks", "running", "waiting",
            "kv_address", "reserved_blocks", "queued_prefill_tokens", "step_time_ms"} <= first.keys()
    assert "instance_id" not in first
    assert (first["free_blocks"], first["total_blocks"], first["running"], first["waiting"]) == (90, 100, 1, 2)
    assert instances[1]["reserved_blocks"] == 10 and instances[1]["state"] == "draining"


def test_no_api_key_sends_no_authorization(addr, router):
    with Client(addr) as c:
        c.complete(token_ids=[65], max_tokens=1)
    assert "authorization" not in router.metadata[0]


def test_unary_calls_retry_unavailable(addr, router):
    router.fail_first = [(grpc.StatusCode.UNAVAILABLE, "starting")]
    with Client(addr) as c:
        assert c.list_models()[0]["id"] == "tiny"


def test_unreachable_server_is_unavailable():
    with serve(ScriptedRouter()) as dead:
        pass                                           # the port is free again
    with Client(dead, max_retries=1) as c:
        with pytest.raises(UnavailableError):
            c.complete(prompt="x")
        with pytest.raises(UnavailableError):
            c.list_instances()


# ---------------------------------------------------------------- AsyncClient
def test_async_stream_complete_and_unary(addr, router):
    async def main():
        async with AsyncClient(addr, api_key="k") as c:
            chunks = [ch async for ch in c.generate(token_ids=[65, 66, 67], max_tokens=3, request_id="a-1")]
            r = await c.complete(prompt="Hey", max_tokens=8)
            with pytest.raises(ValueError):
                c.generate(prompt="a", token_ids=[1])
            return chunks, r, await c.list_models(), await c.list_instances(), await c.abort("nope")

    chunks, r, models, instances, found = asyncio.run(main())
    assert [ch.index for ch in chunks] == [0, 1, 2] and chunks[-1].finish_reason == "length"
    assert r.text == "Hey" and r.ttft_s > 0 and len(r.itl_s) == 2
    assert models[0]["id"] == "tiny" and instances[1]["role"] == "decode" and found is False
    assert all(m["authorization"] == "Bearer k" for m in router.metadata) and router.calls == 2


def test_async_aclose_and_task_cancel_cancel_the_rpc(addr, router):
    router.delay_s = 0.02

    async def consume(c, started: asyncio.Event):
        async for _ in c.generate(token_ids=list(range(1000)), max_tokens=1000):
            started.set()

    async def main():
        async with AsyncClient(addr) as c:
            stream = c.generate(token_ids=list(range(1000)), max_tokens=1000)
            await stream.__anext__()
            await stream.aclose()
            closed = await asyncio.to_thread(router.cancelled.wait, BOUND_S)
            router.cancelled.clear()
            started = asyncio.Event()
            task = asyncio.create_task(consume(c, started))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return closed, await asyncio.to_thread(router.cancelled.wait, BOUND_S)

    assert asyncio.run(main()) == (True, True)


def test_async_retries_timeout_and_errors(addr, router):
    async def main():
        async with AsyncClient(addr, max_retries=2, max_resumes=0) as c:
            router.fail_first = [(grpc.StatusCode.UNAVAILABLE, "later")] * 2
            retried = await c.complete(token_ids=[65], max_tokens=1)
            router.fail_after_tokens = (1, grpc.StatusCode.UNAVAILABLE)
            calls = router.calls
            with pytest.raises(UnavailableError):
                await c.complete(token_ids=[65, 66], max_tokens=2)
            assert router.calls == calls + 1
            router.fail_after_tokens = None
            router.fail_first = [(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")]
            with pytest.raises(InvalidArgumentError, match="prompt is empty"):
                await c.complete(prompt="")
            router.delay_s = 0.05
            with pytest.raises(DeadlineExceededError):
                await c.complete(token_ids=list(range(1000)), max_tokens=1000, timeout=0.3)
            router.delay_s, router.index_gap_at = 0.0, 1
            with pytest.raises(InternalError):
                await c.complete(token_ids=[65, 66, 67], max_tokens=3)
            return retried

    assert asyncio.run(main()).text == "A"
    assert router.calls == 3 + 1 + 1 + 1 + 1


def test_tls_argument_forms(tmp_path):
    from tandem.client import _credentials

    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    given = grpc.ssl_channel_credentials()
    assert _credentials(False) is None and _credentials(given) is given
    assert isinstance(_credentials(True), grpc.ChannelCredentials)
    assert isinstance(_credentials(str(pem)), grpc.ChannelCredentials)
    Client("127.0.0.1:1", tls=True).close()               # a secure channel opens lazily; no RPC made
