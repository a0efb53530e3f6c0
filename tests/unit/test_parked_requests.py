"""A request whose reader dies (issue 18, "router death"), on a real colocated WorkerServicer over
the tiny engine, served by a real in-process gRPC server: a Decode or Generate call cancelled
mid-stream is parked (services/worker/parked.py), listed by Stats as parked, and a Decode by id
without a request takes it back from any index it kept: tokens before that index from the first call
plus those from the second equal an uninterrupted greedy run, with contiguous indexes. A parked
request nobody takes is aborted when the grace ends; Release drops it at once; an Outputs stream
that closes under a request parks it too; grace 0 cancels as before. Every test ends with the engine
empty (integrity checked) and nothing parked."""
from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from services.engine.builder import build_engine
from services.engine.config import Role
from services.engine.engine import RequestOutput
from services.engine.engine_thread import EngineThread
from services.engine.request import FinishReason
from services.engine.sampling_params import SamplingParams
from services.transport import KVLayout, make_receiver, make_sender
from services.worker.async_stream import AsyncRequestStream
from services.worker.call_metadata import OUTPUTS_KEY
from services.worker.servicer import WorkerServicer
from services.worker.token_chunks import ChunkCursor
from tandem.v1 import serving_pb2, worker_pb2, worker_pb2_grpc
from tests.aio import serve_worker
from tests.conftest import random_prompts
# The tiny model, its reference generator and the servicers' block size: the request-path tests'.
from tests.unit.test_request_path import BLOCK, VOCAB, reference, tiny  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.timeout(120)


def run(tiny, body, grace_s: float = 30.0):
    """body(servicer, stub) against a colocated worker with orphan grace `grace_s`; everything closed after."""
    async def go():
        engine = build_engine("tiny", loaded=tiny, role=Role.COLOCATED, block_size=BLOCK, num_blocks=256,
                              max_num_batched_tokens=64)
        layout = KVLayout.of(engine.runner.kv, "tiny")
        sv = WorkerServicer(EngineThread(engine), role=Role.COLOCATED, sender=make_sender("tcp", layout),
                            receiver=make_receiver("tcp", layout, engine.runner.kv), pusher=None, lease_ms=20_000,
                            transfer_timeout_s=5.0, report_fn=worker_pb2.LoadReport, instance_id="colocated-x",
                            kv_transport="tcp", orphan_grace_s=grace_s)
        server, address = await serve_worker(sv)
        channel = grpc.aio.insecure_channel(address)
        try:
            await body(sv, worker_pb2_grpc.WorkerStub(channel))
        finally:
            await channel.close()
            await server.stop(None)
            sv.parked.close()
            sv.et.shutdown()
            sv.sender.close()
            sv.receiver.close()
    asyncio.run(go())


def wreq(rid, prompt, max_tokens):
    return worker_pb2.WorkerRequest(request_id=rid, prompt_token_ids=prompt,
                                    params=serving_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def start(sv, stub, path: str, rid: str, prompt: list[int], n: int, first_token: int, **kw):
    """(call, index of its first chunk): a colocated Generate, or a Decode that reserves and then
    recomputes (its first token given, as after a prefill) and streams from index 1."""
    if path == "generate":
        return stub.Generate(wreq(rid, prompt, n), **kw), 0
    call = stub.Decode(worker_pb2.DecodeRequest(request_id=rid, start_index=1, request=wreq(rid, prompt, n)), **kw)
    await call.initial_metadata()                       # reserved
    await stub.Recompute(worker_pb2.RecomputeRequest(request_id=rid, first_token_id=first_token,
                                                     first_logprob=float("nan")))
    return call, 1


async def read_then_cut(call, n_tokens: int) -> list[worker_pb2.TokenChunk]:
    """The call's chunks until n_tokens came; then the call is cancelled (its reader dies)."""
    got = []
    async for chunk in call:
        got.append(chunk)
        if sum(len(c.token_ids) for c in got) >= n_tokens:
            break
    call.cancel()
    return got


async def until(predicate, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        await asyncio.sleep(0.01)


def _state(engine):
    engine.check_integrity()
    return engine.kv.num_used_blocks, engine.has_unfinished()


async def idle(sv) -> None:
    """The engine empty and consistent (every block free again), nothing parked or leased."""
    for _ in range(250):
        if await asyncio.to_thread(sv.et.call, _state) == (0, False) and len(sv.parked) == 0 \
                and len(sv.leases) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still held: {await asyncio.to_thread(sv.et.call, _state)}, parked {len(sv.parked)}")


async def listed(stub) -> dict[str, worker_pb2.RunningRequest]:
    stats = await stub.Stats(worker_pb2.StatsRequest(list_requests=True))
    return {r.request_id: r for r in stats.requests}


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def assert_contiguous(chunks, start: int) -> None:
    assert [c.index for c in chunks] == [start + len(tokens(chunks[:i])) for i in range(len(chunks))]


@pytest.mark.parametrize("path", ["generate", "decode"])
def test_a_cut_stream_is_parked_listed_and_taken_back_whole(tiny, reference, path):
    prompt = random_prompts([24], VOCAB, seed=41)[0]
    expected = reference(prompt, 150)

    async def body(sv, stub):
        call, first = await start(sv, stub, path, "r", prompt, 150, expected[0])
        got = await read_then_cut(call, 6)
        await until(lambda: "r" in sv.parked, "parked")
        assert "r" not in sv._decoding
        r = (await listed(stub))["r"]
        assert r.parked and r.num_output_tokens >= first + len(tokens(got))
        if path == "decode":             # the first token came from elsewhere: it was never kept here
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [c async for c in stub.Decode(worker_pb2.DecodeRequest(request_id="r", start_index=0))]
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "start_index 0" in e.value.details()
            assert "r" in sv.parked
        # The dead reader had more than its client: resume below what this call delivered.
        resume_at = first + len(tokens(got)) - 3
        entry = sv.parked.get("r")
        resumed = [c async for c in stub.Decode(worker_pb2.DecodeRequest(request_id="r", start_index=resume_at))]
        assert entry.over and "r" not in sv.parked
        assert_contiguous(resumed, resume_at)
        assert resumed[-1].finished and resumed[-1].finish_reason == serving_pb2.FINISH_REASON_LENGTH
        before = expected[:first] + tokens(got)
        assert before[:resume_at] + tokens(resumed) == expected
        await idle(sv)
    run(tiny, body)


def test_a_request_that_finishes_while_parked_is_kept_until_taken(tiny, reference):
    prompt = random_prompts([20], VOCAB, seed=42)[0]
    expected = reference(prompt, 100)

    async def body(sv, stub):
        call, _ = await start(sv, stub, "generate", "f", prompt, 100, expected[0])
        got = await read_then_cut(call, 3)
        await until(lambda: "f" in sv.parked and sv.parked.get("f").cursor.ended, "finished while parked")
        assert await asyncio.to_thread(sv.et.call, _state) == (0, False)       # the engine is done with it
        r = (await listed(stub))["f"]
        assert (r.parked, r.running, r.num_output_tokens, r.num_tokens) == (True, False, 100, 120)
        resumed = [c async for c in stub.Decode(worker_pb2.DecodeRequest(request_id="f", start_index=len(tokens(got))))]
        assert_contiguous(resumed, len(tokens(got)))
        assert tokens(got) + tokens(resumed) == expected and resumed[-1].finished
        assert resumed[-1].muxed_chunks == 0 and not resumed[0].first_decode_s    # per-reader fields cleared
        await idle(sv)
    run(tiny, body)


def test_a_parked_request_nobody_takes_is_aborted_when_the_grace_ends(tiny, reference):
    prompt = random_prompts([24], VOCAB, seed=43)[0]

    async def body(sv, stub):
        call, _ = await start(sv, stub, "generate", "g", prompt, 2000, 0)
        await read_then_cut(call, 2)
        await until(lambda: "g" in sv.parked, "parked")
        entry, parked_at = sv.parked.get("g"), time.monotonic()
        await until(lambda: "g" not in sv.parked, "the grace to end")
        assert time.monotonic() - parked_at >= 0.25
        assert entry.over and entry.cursor.index < 2000          # aborted, not finished
        assert "g" not in await listed(stub)
        await idle(sv)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [c async for c in stub.Decode(worker_pb2.DecodeRequest(request_id="g", start_index=2))]
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    run(tiny, body, grace_s=0.3)


def test_release_of_a_parked_request_frees_it_at_once(tiny):
    prompt = random_prompts([24], VOCAB, seed=44)[0]

    async def body(sv, stub):
        call, _ = await start(sv, stub, "generate", "x", prompt, 1500, 0)
        await read_then_cut(call, 2)
        await until(lambda: "x" in sv.parked, "parked")
        assert (await stub.Release(worker_pb2.ReleaseRequest(request_id="x"))).found
        assert "x" not in sv.parked
        await idle(sv)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [c async for c in stub.Decode(worker_pb2.DecodeRequest(request_id="x", start_index=2))]
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    run(tiny, body)


def test_a_stopping_worker_drops_what_is_parked_and_parks_nothing_more(tiny):
    prompt = random_prompts([24], VOCAB, seed=49)[0]

    async def body(sv, stub):
        call, _ = await start(sv, stub, "generate", "s1", prompt, 1500, 0)
        await read_then_cut(call, 2)
        await until(lambda: "s1" in sv.parked, "parked")
        call, _ = await start(sv, stub, "generate", "s2", prompt, 1500, 0)
        await call.read()
        sv.parked.close()                                 # Worker.stop, before the server's grace
        assert len(sv.parked) == 0
        call.cancel()
        await idle(sv)                                    # s2 was cancelled, not parked
    run(tiny, body)


def test_a_release_that_overtakes_the_park_wins(tiny):
    """The router cancels its call, then releases: a Release that reaches the worker before the
    cancel does leaves nothing parked afterwards."""
    prompt = random_prompts([16], VOCAB, seed=45)[0]

    async def body(sv, stub):
        assert not (await stub.Release(worker_pb2.ReleaseRequest(request_id="y"))).found
        stream = sv.et.submit(prompt, SamplingParams(max_tokens=500, ignore_eos=True), "y",
                              stream_cls=AsyncRequestStream.factory(asyncio.get_running_loop()))
        cursor = ChunkCursor(0, False)
        cursor.keep_history()
        assert not sv.parked.park(stream, cursor, "its call ended")
        stream.cancel()
        await idle(sv)
    run(tiny, body)


def test_an_outputs_stream_that_closes_parks_its_requests(tiny, reference):
    prompt = random_prompts([24], VOCAB, seed=46)[0]
    expected = reference(prompt, 150)

    async def body(sv, stub):
        outputs = stub.Outputs(worker_pb2.OutputsRequest(id="router-1"))
        await outputs.initial_metadata()
        call, _ = await start(sv, stub, "generate", "o", prompt, 150, 0, metadata=((OUTPUTS_KEY, "router-1"),))
        got = []
        async for batch in outputs:
            got.extend(batch.chunks)
            if len(tokens(got)) >= 4:
                break
        outputs.cancel()                                  # the router's Outputs stream dies
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [c async for c in call]
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "parked" in e.value.details()
        assert "o" in sv.parked and (await listed(stub))["o"].parked
        resumed = [c async for c in stub.Decode(worker_pb2.DecodeRequest(request_id="o", start_index=len(tokens(got))))]
        assert tokens(got) + tokens(resumed) == expected
        assert_contiguous(resumed, len(tokens(got)))
        await idle(sv)
    run(tiny, body)


class FakeContext:
    async def abort(self, code, details):
        raise AssertionError(f"aborted {code.name}: {details}")

    def invocation_metadata(self):
        return ()


def test_a_stream_its_server_closes_mid_way_is_parked_too(tiny, reference):
    """gRPC may close the handler's generator (GeneratorExit at a yield) instead of cancelling it."""
    prompt = random_prompts([24], VOCAB, seed=48)[0]
    expected = reference(prompt, 150)

    async def body(sv, stub):
        gen = sv.Generate(wreq("e", prompt, 150), FakeContext())
        got = [await gen.__anext__() for _ in range(3)]
        await gen.aclose()
        assert "e" in sv.parked and sv.parked.get("e").stream.divert is None
        resumed = [c async for c in stub.Decode(worker_pb2.DecodeRequest(request_id="e", start_index=1))]
        assert tokens(got)[:1] + tokens(resumed) == expected
        await idle(sv)
    run(tiny, body)


def test_with_grace_zero_a_cut_stream_is_cancelled(tiny):
    prompt = random_prompts([24], VOCAB, seed=47)[0]

    async def body(sv, stub):
        call, _ = await start(sv, stub, "generate", "z", prompt, 1500, 0)
        await read_then_cut(call, 2)
        await idle(sv)
        assert "z" not in await listed(stub)
    run(tiny, body, grace_s=0.0)


def test_resuming_an_unknown_request_is_not_found(tiny):
    async def body(sv, stub):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [c async for c in stub.Decode(worker_pb2.DecodeRequest(request_id="nobody", start_index=3))]
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    run(tiny, body)


def test_kept_chunks_stay_whole_and_replay_from_any_index():
    cursor = ChunkCursor(2, False, start_index=4)
    cursor.keep_history()
    out = lambda toks, done=False: RequestOutput(request_id="c", new_token_ids=toks, new_text="", finished=done,
                                                 finish_reason=FinishReason.LENGTH if done else None)
    assert cursor.chunk([out([10])]) is None                         # below start_index: not handed out
    handed = cursor.chunk([out([12, 13, 14])])                        # straddles 4: trimmed copy
    assert (handed.index, list(handed.token_ids)) == (4, [13, 14])
    cursor.chunk([out([15], done=True)])
    assert [(c.index, list(c.token_ids)) for c in cursor.history] == [(2, [10]), (3, [12, 13, 14]), (6, [15])]
    assert [(c.index, list(c.token_ids)) for c in cursor.replay(3)] == [(3, [12, 13, 14]), (6, [15])]
    assert [(c.index, list(c.token_ids)) for c in cursor.replay(5)] == [(5, [14]), (6, [15])]
    assert [(c.index, list(c.token_ids), c.finished) for c in cursor.replay(9)] == [(9, [], True)]
    assert cursor.ended and cursor.kept_at(2) and not cursor.kept_at(1)
    with pytest.raises(ValueError, match="start_index 1"):
        cursor.replay(1)


def test_a_whole_requests_first_chunk_carries_its_engine_queue_and_prefill_time(monkeypatch):
    import services.worker.token_chunks as token_chunks
    monkeypatch.setattr(token_chunks.time, "monotonic", lambda: 100.0)      # the moment the chunk is made
    cursor = ChunkCursor(0, False, arrival=99.5)
    cursor.keep_history()
    out = RequestOutput(request_id="w", new_token_ids=[7], new_text="", finished=False, finish_reason=None,
                        first_scheduled_time=99.8)
    first = cursor.chunk([out])
    assert (first.queue_s, first.prefill_s) == pytest.approx((0.3, 0.2))   # arrival → scheduled → this token
    second = cursor.chunk([RequestOutput(request_id="w", new_token_ids=[8], new_text="", finished=False,
                                         finish_reason=None, first_scheduled_time=99.8)])
    assert second.queue_s == second.prefill_s == 0.0  # the first chunk only
    assert cursor.replay(0)[0].queue_s == 0.0         # a reader taking the stream over is not the first


def test_a_parked_request_is_not_migrated(tiny, reference):
    """No router would follow it to a destination: the rescheduler's picks pass it over and a
    Migrate naming it is refused; a router resuming it finds it here."""
    from services.worker.migration_out import MigrationError
    prompt = random_prompts([16], VOCAB, seed=47)[0]
    expected = reference(prompt, 2000)

    async def body(sv, stub):
        call, _ = await start(sv, stub, "generate", "m", prompt, 2000, expected[0])
        await read_then_cut(call, 3)
        await until(lambda: "m" in sv.parked, "parked")
        with pytest.raises(MigrationError) as refused:
            await sv.sources.migrate(worker_pb2.MigrateRequest(request_id="m", destination_instance_id="elsewhere",
                                                               destination_address="127.0.0.1:1"))
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and "parked" in str(refused.value)
        with pytest.raises(MigrationError) as none:
            await sv.sources.pick("shortest")
        assert none.value.code == grpc.StatusCode.NOT_FOUND
        await stub.Release(worker_pb2.ReleaseRequest(request_id="m"))
        await idle(sv)
    run(tiny, body)
