"""A KV transfer that fails falls back to recompute instead of failing the request.

Prefill side: the pusher keeps a broken transfer out of the engine step (the other requests of the
instance go on), and Prefill answers with its first token and `kv_fallback` whether opening,
pushing or committing failed. Decode side: LeaseTable.recompute settles a pending lease exactly
once against a racing KV commit, and the Recompute RPC decodes the request from index 1 with the
tokens an engine that never moved the KV produces. The transport is faked here (tiny in-memory
transfers): what is under test is what Tandem does when it fails.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time

import grpc
import pytest

from services.engine.builder import build_engine
from services.engine.config import Role
from services.engine.engine_thread import EngineThread
from services.engine.loader import resolve_model
from services.engine.request import FinishReason
from services.engine.sampling_params import SamplingParams
from services.transport import KVHandshakeError, KVTransportError, OutgoingTransfer, TransferStats
from services.worker.kv_push import PrefillPusher
from services.worker.leases import Lease, LeaseNotFound, LeaseReleased, LeaseState, LeaseTable
from services.worker.servicer import WorkerServicer
from tandem.v1 import serving_pb2, worker_pb2
from tests.conftest import random_prompts

pytestmark = pytest.mark.timeout(120)

VOCAB = 512
BLOCK = 8
BROKEN = KVTransportError("connection to the KV receiver at 10.0.0.9:7100 failed: connection reset by peer")


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny")


def new_engine(tiny, role=Role.COLOCATED):
    return build_engine("tiny", loaded=tiny, role=role, block_size=BLOCK, num_blocks=256, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def reference(tiny):
    """reference(prompt, max_tokens) → (tokens, logprobs) of greedy decoding on one engine, KV never moved."""
    engine = new_engine(tiny)

    def run(prompt, max_tokens):
        out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=0))[0]
        return out.token_ids, out.logprobs
    return run


class FakeTransfer(OutgoingTransfer):
    """Records pushes; fails the push numbered `fail_at` (0-based) and every later one, like a
    transfer whose connection broke, or its commit with `commit_error`."""

    def __init__(self, fail_at: int | None = None, error: Exception = BROKEN, commit_error: Exception | None = None):
        self.fail_at, self.error, self.commit_error = fail_at, error, commit_error
        self.pushes: list[tuple[list[int], int, int, int]] = []
        self.attempts = 0
        self.committed: tuple[int, dict] | None = None
        self.aborted: str | None = None

    def push(self, src_block_ids, first_index, layer_start, layer_end):
        self.attempts += 1
        if self.fail_at is not None and self.attempts > self.fail_at:
            raise self.error
        self.pushes.append((list(src_block_ids), first_index, layer_start, layer_end))

    def commit(self, num_tokens, meta, timeout):
        if self.commit_error is not None:
            raise self.commit_error
        self.committed = (num_tokens, meta)
        return TransferStats("fake", bytes=1, window_s=0.0, num_frames=len(self.pushes))

    def abort(self, reason=""):
        if self.committed is None and self.aborted is None:
            self.aborted = reason

    def covered(self) -> set[tuple[int, int]]:
        """(logical block, layer) pairs pushed."""
        return {(first + i, layer) for blocks, first, l0, l1 in self.pushes for layer in range(l0, l1)
                for i in range(len(blocks))}


# ---------------------------------------------------------------- the pusher on the engine thread
@pytest.mark.parametrize("error", [BROKEN, ValueError("src_block_ids: block 9999 is out of range")],
                         ids=["transport-error", "value-error"])
def test_a_failed_push_stops_that_request_only_and_the_engine_serves_on(tiny, reference, error):
    engine = new_engine(tiny, role=Role.PREFILL)
    layers = engine.config.model.num_layers
    pusher = PrefillPusher(engine.kv.block_table, BLOCK, layers, layer_group=1)
    engine.on_prefill_layer = pusher
    et = EngineThread(engine)
    try:
        broken, good = FakeTransfer(fail_at=2, error=error), FakeTransfer()
        pusher.register("broken", broken)
        pusher.register("good", good)
        prompts = random_prompts([150, 150, 20], VOCAB, seed=7)    # 150 tokens: several chunks of 64
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        streams = [et.submit(prompts[0], params, "broken"), et.submit(prompts[1], params, "good")]
        outs = [s.result() for s in streams]

        for prompt, out in zip(prompts, outs):        # both prefills ran to their first token
            assert out.finish_reason == FinishReason.HANDOFF
            assert out.token_ids == reference(prompt, 1)[0]
        assert str(error) in pusher.failure("broken")
        assert broken.attempts == 3 and len(broken.pushes) == 2, "a push after the failure"
        assert pusher.failure("good") is None
        blocks = -(-len(prompts[1]) // BLOCK)
        assert good.covered() == {(b, layer) for b in range(blocks) for layer in range(layers)}

        after = et.submit(prompts[2], params, "after").result()   # the engine thread is alive and serving
        assert after.token_ids == reference(prompts[2], 1)[0]
        assert str(error) in pusher.unregister("broken")
        assert pusher.failure("broken") is None and pusher.unregister("good") is None
        for rid in ("broken", "good", "after"):
            et.call(lambda e, rid=rid: e.release(rid))
        et.call(lambda e: e.check_integrity())
        assert et.call(lambda e: e.kv.num_used_blocks) == 0
    finally:
        et.shutdown()


# ---------------------------------------------------------------- in-process servicers
class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    async def abort(self, code, details):
        raise Aborted(code, details)


class FakeSender:
    """open() fails with `open_error`, else hands out `transfer`."""

    def __init__(self, transfer: FakeTransfer | None = None, open_error: Exception | None = None):
        self.transfer, self.open_error = transfer, open_error

    def open(self, request_id, address, kv):
        if self.open_error is not None:
            raise self.open_error
        return self.transfer

    def close(self):
        pass

    def stats(self):
        return {}


class FakeReceiver:
    """Remembers what it expects; `events` logs expect/forget in order."""

    address = "127.0.0.1:7100"

    def __init__(self):
        self.expected: dict[str, object] = {}
        self.events: list[tuple[str, str]] = []

    def expect(self, rid, block_ids, on_commit):
        self.expected[rid] = on_commit
        self.events.append(("expect", rid))

    def forget(self, rid):
        self.expected.pop(rid, None)
        self.events.append(("forget", rid))


def make_servicer(engine, role, sender=None, receiver=None) -> WorkerServicer:
    et = EngineThread(engine)
    pusher = None
    if role == Role.PREFILL:
        pusher = PrefillPusher(engine.kv.block_table, BLOCK, engine.config.model.num_layers, layer_group=1)
        engine.on_prefill_layer = pusher
    return WorkerServicer(et, role=role, sender=sender or FakeSender(FakeTransfer()), receiver=receiver or FakeReceiver(),
                          pusher=pusher, lease_ms=20_000, transfer_timeout_s=2.0,
                          report_fn=worker_pb2.LoadReport, instance_id=f"{role.name.lower()}-x", kv_transport="tcp")


def wreq(rid: str, prompt: list[int], max_tokens: int, **params) -> worker_pb2.WorkerRequest:
    return worker_pb2.WorkerRequest(request_id=rid, prompt_token_ids=prompt, params=serving_pb2.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, **params))


async def engine_idle(sv: WorkerServicer) -> None:
    def check(e):
        e.check_integrity()
        return e.kv.num_used_blocks, e.has_unfinished()
    assert await asyncio.to_thread(sv.et.call, check) == (0, False)
    assert len(sv.leases) == 0


@pytest.mark.parametrize("where", ["open", "push", "commit"])
def test_prefill_answers_with_kv_fallback_when_the_transfer_fails(tiny, reference, where):
    prompt = random_prompts([100], VOCAB, seed=11)[0]
    transfer = FakeTransfer(fail_at=1 if where == "push" else None,
                            commit_error=KVTransportError("no ACK within 2.0 s") if where == "commit" else None)
    sender = FakeSender(transfer, open_error=KVTransportError("connection refused") if where == "open" else None)
    sv = make_servicer(new_engine(tiny, role=Role.PREFILL), Role.PREFILL, sender=sender)
    dest = worker_pb2.KVHandle(instance_id="decode-7", address="10.0.0.9:7100", request_id="r")

    async def go():
        try:
            resp = await sv.Prefill(worker_pb2.PrefillRequest(request=wreq("r", prompt, 8, logprobs=2),
                                                              destination=dest), FakeContext())
            await engine_idle(sv)
            return resp
        finally:
            sv.et.shutdown()
    resp = asyncio.run(go())

    tokens, logprobs = reference(prompt, 1)
    assert resp.first_token_id == tokens[0] and not resp.finished
    assert math.isclose(resp.first_logprob, logprobs[0], rel_tol=1e-5)
    assert len(resp.first_top_logprobs.token_ids) == 2
    assert "decode-7" in resp.kv_fallback and resp.kv_bytes == 0
    expected = {"open": "cannot reach decode instance decode-7 at 10.0.0.9:7100: connection refused",
                "push": "KV push to decode instance decode-7 failed: " + str(BROKEN),
                "commit": "KV commit to decode instance decode-7 failed: no ACK within 2.0 s"}[where]
    assert resp.kv_fallback == expected
    if where != "open":
        assert transfer.committed is None and transfer.aborted == expected      # nothing leaks on the way
    assert sv.pusher.failure("r") is None


def test_prefill_without_failure_commits_and_sets_no_fallback(tiny):
    transfer = FakeTransfer()
    sv = make_servicer(new_engine(tiny, role=Role.PREFILL), Role.PREFILL, sender=FakeSender(transfer))

    async def go():
        try:
            return await sv.Prefill(worker_pb2.PrefillRequest(
                request=wreq("ok", [5, 6, 7, 8, 9], 4), destination=worker_pb2.KVHandle(address="h:1")), FakeContext())
        finally:
            sv.et.shutdown()
    resp = asyncio.run(go())
    assert resp.kv_fallback == "" and transfer.committed[0] == 5 and transfer.aborted is None


def test_a_layout_mismatch_still_fails_prefill_loudly(tiny):
    mismatch = KVHandshakeError("block_size differs: 16 here, 32 on the peer; start both with the same --block-size")
    sv = make_servicer(new_engine(tiny, role=Role.PREFILL), Role.PREFILL, sender=FakeSender(open_error=mismatch))

    async def go():
        try:
            await sv.Prefill(worker_pb2.PrefillRequest(request=wreq("m", [5, 6, 7], 4),
                                                       destination=worker_pb2.KVHandle(address="h:1")), FakeContext())
        finally:
            sv.et.shutdown()
    with pytest.raises(Aborted) as e:
        asyncio.run(go())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "block_size" in e.value.details


def test_recompute_decodes_from_index_1_like_an_engine_that_kept_the_kv(tiny, reference):
    prompt = random_prompts([70], VOCAB, seed=12)[0]
    tokens, logprobs = reference(prompt, 10)
    receiver = FakeReceiver()
    sv = make_servicer(new_engine(tiny, role=Role.DECODE), Role.DECODE, receiver=receiver)

    async def go():
        try:
            ctx = FakeContext()
            await sv.Reserve(worker_pb2.ReserveRequest(request=wreq("r", prompt, 10, logprobs=0)), ctx)

            async def read():
                return [c async for c in sv.Decode(worker_pb2.DecodeRequest(request_id="r", start_index=1), ctx)]
            decode = asyncio.ensure_future(read())
            await sv.Recompute(worker_pb2.RecomputeRequest(request_id="r", first_token_id=tokens[0],
                                                           first_logprob=logprobs[0]), ctx)
            chunks = await decode
            with pytest.raises(Aborted) as gone:          # the lease was claimed and the stream ended
                await sv.Recompute(worker_pb2.RecomputeRequest(request_id="r", first_token_id=tokens[0]), ctx)
            await engine_idle(sv)
            return chunks, gone.value
        finally:
            sv.et.shutdown()
    chunks, gone = asyncio.run(go())

    assert receiver.events[:2] == [("expect", "r"), ("forget", "r")]     # forgotten before adopting
    assert chunks[0].index == 1 and chunks[-1].finished
    assert [t for c in chunks for t in c.token_ids] == tokens[1:]
    got = [lp for c in chunks for lp in c.logprobs]
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(got, logprobs[1:]))
    assert gone.code == grpc.StatusCode.NOT_FOUND and "'r'" in gone.details


def test_recompute_of_an_unknown_request_or_without_id_is_refused(tiny):
    sv = make_servicer(new_engine(tiny, role=Role.DECODE), Role.DECODE)

    async def go():
        try:
            errors = []
            for request in (worker_pb2.RecomputeRequest(request_id="never-reserved", first_token_id=9),
                            worker_pb2.RecomputeRequest(first_token_id=9)):
                with pytest.raises(Aborted) as e:
                    await sv.Recompute(request, FakeContext())
                errors.append(e.value)
            await engine_idle(sv)
            return errors
        finally:
            sv.et.shutdown()
    unknown, empty = asyncio.run(go())
    assert unknown.code == grpc.StatusCode.NOT_FOUND and "'never-reserved'" in unknown.details
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in empty.details


# ---------------------------------------------------------------- the lease table: adopted exactly once
class FakeEngineSide:
    """adopt/release/forget for a LeaseTable. A release waits for `gate` once it started (`releasing`)."""

    def __init__(self):
        self.adopted: list[tuple[str, bool]] = []
        self.forgotten: list[str] = []
        self.releasing, self.gate = asyncio.Event(), asyncio.Event()
        self.gate.set()

    def adopt(self, lease, meta, recompute):
        self.adopted.append((lease.request_id, recompute))
        return object()

    async def release(self, lease):
        self.releasing.set()
        await self.gate.wait()


def lease_table_run(body):
    async def go():
        side = FakeEngineSide()
        table = LeaseTable(side.adopt, side.release, side.forgotten.append)

        def add(rid):
            lease = Lease(rid, [1, 2, 3], SamplingParams(), 0, [0], time.monotonic() + 30, asyncio.get_running_loop())
            table.add(lease)
            return lease
        return await body(table, side, add)
    return asyncio.run(go())


def test_recompute_then_a_late_commit_is_refused():
    async def body(table, side, add):
        lease = add("r")
        assert await asyncio.to_thread(table.recompute, "r", {"first_token_id": 4, "first_logprob": None})
        await asyncio.wait_for(lease.settled.wait(), 10)
        refused = table.commit("r", 3, {"first_token_id": 4})
        assert refused and "no pending lease" in refused
        assert side.forgotten == ["r"] and side.adopted == [("r", True)]
        assert lease.state == LeaseState.ADOPTED and lease.output_token_ids == [4]
        assert not await table.release("r", "too late")        # adopted: nothing to release
        assert table.claim("r") is lease
    lease_table_run(body)


def test_a_commit_that_won_makes_recompute_a_no_op():
    async def body(table, side, add):
        add("r")
        assert table.commit("r", 3, {"first_token_id": 4}) is None
        assert await asyncio.to_thread(table.recompute, "r", {"first_token_id": 4}) is False
        assert side.adopted == [("r", False)]               # decoding once, from the KV
        table.claim("r")
    lease_table_run(body)


def test_racing_commit_and_recompute_adopt_exactly_once():
    async def body(table, side, add):
        for i in range(50):
            add(f"r{i}")
        barrier = threading.Barrier(2)

        def commit(rid):
            barrier.wait()
            return table.commit(rid, 3, {"first_token_id": 4})

        def recompute(rid):
            barrier.wait()
            return table.recompute(rid, {"first_token_id": 4})
        for i in range(50):
            refused, adopted = await asyncio.gather(asyncio.to_thread(commit, f"r{i}"),
                                                    asyncio.to_thread(recompute, f"r{i}"))
            assert (refused is None) != adopted, f"r{i}: commit refused={refused!r}, recompute adopted={adopted}"
        assert sorted(rid for rid, _ in side.adopted) == sorted(f"r{i}" for i in range(50))
    lease_table_run(body)


def test_recompute_of_unknown_or_released_leases_raises():
    async def body(table, side, add):
        with pytest.raises(LeaseNotFound, match="'ghost'"):
            await asyncio.to_thread(table.recompute, "ghost", {"first_token_id": 1})
        add("gone")
        side.gate.clear()                                   # the release stays in progress
        releasing = asyncio.ensure_future(table.release("gone", "the decode stream was cancelled"))
        await side.releasing.wait()
        with pytest.raises(LeaseReleased, match="'gone'.*cancelled"):
            await asyncio.to_thread(table.recompute, "gone", {"first_token_id": 1})
        side.gate.set()
        assert await releasing
        with pytest.raises(LeaseNotFound, match="'gone'"):  # and once it finished
            await asyncio.to_thread(table.recompute, "gone", {"first_token_id": 1})
        assert side.adopted == [] and len(table) == 0
    lease_table_run(body)
