"""The one-round-trip request path between a prefill and a decode worker, in process: two real
WorkerServicers over real engines (tiny) and the real tcp KV transport on loopback; only gRPC is
left out (a fake context). Decode carries the request and reserves; Prefill starts computing at
once and opens its transfer beside it. The orders that can happen are forced one by one: the
reservation first, the transfer's frames first (held at the receiver until it lands), a cancel
while they are held, a decode instance with no room. Tokens equal an engine that never moved the
KV, and every test ends with both engines empty and no lease.
"""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from services.engine.builder import build_engine
from services.engine.config import Role
from services.engine.engine_thread import EngineThread
from services.engine.loader import resolve_model
from services.engine.sampling_params import SamplingParams
from services.transport import KVLayout, make_receiver, make_sender
from services.worker.kv_push import PrefillPusher
from services.worker.leases import LeaseState
from services.worker.call_metadata import RESERVED_KEY
from services.worker.servicer import WorkerServicer
from tandem.v1 import serving_pb2, worker_pb2
from tests.conftest import random_prompts

pytestmark = pytest.mark.timeout(120)

VOCAB = 512
BLOCK = 8


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def reference(tiny):
    engine = build_engine("tiny", loaded=tiny, block_size=BLOCK, num_blocks=256, max_num_batched_tokens=64)
    return lambda prompt, n: engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    def __init__(self):
        self.metadata = None
        self.sent_metadata = asyncio.Event()

    async def abort(self, code, details):
        raise Aborted(code, details)

    async def send_initial_metadata(self, metadata):
        self.metadata = dict(metadata)
        self.sent_metadata.set()


class Pair:
    """A prefill and a decode servicer joined by the tcp transport (P's sender → D's receiver)."""

    def __init__(self, tiny, decode_blocks: int = 256, open_wait_s: float = 5.0):
        self.p_engine = build_engine("tiny", loaded=tiny, role=Role.PREFILL, block_size=BLOCK, num_blocks=256,
                                     max_num_batched_tokens=64)
        self.d_engine = build_engine("tiny", loaded=tiny, role=Role.DECODE, block_size=BLOCK,
                                     num_blocks=decode_blocks, max_num_batched_tokens=64)
        layout = KVLayout.of(self.p_engine.runner.kv, "tiny")
        self.sender = make_sender("tcp", layout, timeout_s=10)
        self.receiver = make_receiver("tcp", layout, self.d_engine.runner.kv, timeout_s=10)
        self.receiver.open_wait_s = open_wait_s
        self.pushed = threading.Event()        # set once P's engine pushed (or held) a layer group
        pusher = PrefillPusher(self.p_engine.kv.block_table, BLOCK, self.p_engine.config.model.num_layers, 1)

        def on_layer(prefills, layer):
            pusher(prefills, layer)
            self.pushed.set()
        self.p_engine.on_prefill_layer = on_layer
        self.full_calls = 0
        common = dict(lease_ms=20_000, transfer_timeout_s=5.0, report_fn=worker_pb2.LoadReport, kv_transport="tcp")
        self.p = WorkerServicer(EngineThread(self.p_engine), role=Role.PREFILL, sender=self.sender,
                                receiver=make_receiver("tcp", layout, self.p_engine.runner.kv), pusher=pusher,
                                instance_id="prefill-x", **common)
        self.d = WorkerServicer(EngineThread(self.d_engine), role=Role.DECODE, sender=make_sender("tcp", layout),
                                receiver=self.receiver, pusher=None, instance_id="decode-x",
                                on_full=self._full, **common)

    def _full(self):
        self.full_calls += 1

    def prefill_request(self, rid, prompt, max_tokens):
        return worker_pb2.PrefillRequest(request=wreq(rid, prompt, max_tokens), destination=worker_pb2.KVHandle(
            instance_id="decode-x", address=self.receiver.address, request_id=rid, block_size=BLOCK))

    async def idle(self):
        """Both engines empty and consistent, no lease: poll, clean-up is asynchronous."""
        for _ in range(200):
            states = [await asyncio.to_thread(sv.et.call, _state) for sv in (self.p, self.d)]
            if all(s == (0, False) for s in states) and len(self.d.leases) == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"still held: {states}, leases {len(self.d.leases)}")

    def close(self):
        for sv in (self.p, self.d):
            sv.et.shutdown()
            sv.sender.close()
            sv.receiver.close()


def _state(engine):
    engine.check_integrity()
    return engine.kv.num_used_blocks, engine.has_unfinished()


def wreq(rid, prompt, max_tokens):
    return worker_pb2.WorkerRequest(request_id=rid, prompt_token_ids=prompt,
                                    params=serving_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def decode_request(rid, prompt, max_tokens):
    return worker_pb2.DecodeRequest(request_id=rid, start_index=1, request=wreq(rid, prompt, max_tokens))


async def read_decode(sv, request, ctx):
    return [t for chunk in [c async for c in sv.Decode(request, ctx)] for t in chunk.token_ids]


def run(tiny, body, **pair_args):
    async def go():
        pair = Pair(tiny, **pair_args)
        try:
            return await body(pair)
        finally:
            pair.close()
    return asyncio.run(go())


@pytest.mark.parametrize("first", ["reservation", "transfer"])
def test_decode_reserves_and_prefill_pushes_in_either_order(tiny, reference, first):
    """Decode and Prefill start together; whichever reaches the decode instance first, the KV lands
    in the reservation and the tokens equal an engine that kept the KV. With the transfer first,
    P has pushed (held at D's receiver) before D reserves."""
    prompt = random_prompts([150], VOCAB, seed=31)[0]
    expected = reference(prompt, 12)

    async def body(pair):
        ctx = FakeContext()
        prefill = asyncio.ensure_future(pair.p.Prefill(pair.prefill_request("r", prompt, 12), FakeContext()))
        if first == "transfer":
            assert await asyncio.to_thread(pair.pushed.wait, 10)
        decode = asyncio.ensure_future(read_decode(pair.d, decode_request("r", prompt, 12), ctx))
        await asyncio.wait_for(ctx.sent_metadata.wait(), 10)
        assert ctx.metadata == {RESERVED_KEY: str(-(-150 // BLOCK))}
        resp = await prefill
        tokens = await decode
        assert resp.kv_fallback == "" and resp.kv_bytes > 0
        assert [resp.first_token_id] + tokens == expected
        assert pair.receiver.stats()["bytes_discarded"] == 0
        await pair.idle()
    run(tiny, body)


def test_a_decode_cancelled_while_its_kv_is_held_releases_everything(tiny):
    """P's frames wait at D's receiver for a reservation; the Decode that would make it is cancelled
    right after reserving: D frees the lease and forgets the request, P's transfer is refused at
    once (not after the receiver's wait), P still answers (kv_fallback) and frees its blocks."""
    prompt = random_prompts([150], VOCAB, seed=32)[0]

    async def body(pair):
        prefill = asyncio.ensure_future(pair.p.Prefill(pair.prefill_request("c", prompt, 8), FakeContext()))
        assert await asyncio.to_thread(pair.pushed.wait, 10)
        ctx = FakeContext()
        decode = asyncio.ensure_future(read_decode(pair.d, decode_request("c", prompt, 8), ctx))
        await asyncio.wait_for(ctx.sent_metadata.wait(), 10)
        decode.cancel()
        with pytest.raises(asyncio.CancelledError):
            await decode
        resp = await asyncio.wait_for(prefill, 10)       # the receiver's 60 s wait did not run out
        assert resp.kv_fallback and "decode-x" in resp.kv_fallback
        await pair.idle()
    run(tiny, body, open_wait_s=60.0)


def test_a_decode_cancelled_before_it_reserves_leaves_nothing(tiny):
    prompt = random_prompts([40], VOCAB, seed=33)[0]

    async def body(pair):
        decode = asyncio.ensure_future(read_decode(pair.d, decode_request("early", prompt, 8), FakeContext()))
        await asyncio.sleep(0)                  # cancelled on its first step (its reservation shielded)
        decode.cancel()
        with pytest.raises(asyncio.CancelledError):
            await decode
        await pair.idle()                       # the reservation landed, then was released
        assert pair.d.leases.get("early") is None
    run(tiny, body)


def test_a_full_decode_instance_refuses_at_once_and_the_transfer_is_refused_too(tiny):
    """No room on D: Decode ends RESOURCE_EXHAUSTED before any metadata, D asks for a fresh report
    (on_full), and a transfer P opened for the request is refused at once, so P answers with
    kv_fallback instead of waiting out the receiver."""
    prompt = random_prompts([100], VOCAB, seed=34)[0]        # 13 blocks of 8

    async def body(pair):               # D has 32 blocks; another reservation holds 24 of them
        await pair.d.Reserve(worker_pb2.ReserveRequest(request=wreq("hog", [7] * 190, 2)), FakeContext())
        prefill = asyncio.ensure_future(pair.p.Prefill(pair.prefill_request("big", prompt, 4), FakeContext()))
        assert await asyncio.to_thread(pair.pushed.wait, 10)
        ctx = FakeContext()
        with pytest.raises(Aborted) as refused:
            await read_decode(pair.d, decode_request("big", prompt, 4), ctx)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and ctx.metadata is None
        assert pair.full_calls == 1
        resp = await asyncio.wait_for(prefill, 10)
        assert resp.kv_fallback
        await pair.d.Release(worker_pb2.ReleaseRequest(request_id="hog"), FakeContext())
        await pair.idle()
    run(tiny, body, decode_blocks=32, open_wait_s=60.0)


def test_decode_of_a_request_reserved_already_ignores_the_request_it_carries(tiny, reference):
    """Reserve first (tools, tests), then Decode with the request: today's behaviour, no second
    reservation and no metadata; a Decode without request and without lease is NOT_FOUND."""
    prompt = random_prompts([30], VOCAB, seed=35)[0]
    expected = reference(prompt, 6)

    async def body(pair):
        with pytest.raises(Aborted) as missing:
            await read_decode(pair.d, worker_pb2.DecodeRequest(request_id="none", start_index=1), FakeContext())
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        await pair.d.Reserve(worker_pb2.ReserveRequest(request=wreq("r", prompt, 6)), FakeContext())
        ctx = FakeContext()
        decode = asyncio.ensure_future(read_decode(pair.d, decode_request("r", prompt, 6), ctx))
        resp = await pair.p.Prefill(pair.prefill_request("r", prompt, 6), FakeContext())
        assert [resp.first_token_id] + await decode == expected and ctx.metadata is None
        await pair.idle()
    run(tiny, body)


def test_workers_refuse_out_of_vocabulary_ids_cheaply(tiny):
    """The router validated; a worker still refuses what would crash its engine."""
    async def body(pair):
        bad = wreq("bad", [5, 6, VOCAB + 3], 4)
        with pytest.raises(Aborted) as e:
            await read_decode(pair.d, worker_pb2.DecodeRequest(request_id="bad", start_index=1, request=bad),
                              FakeContext())
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.details
        with pytest.raises(Aborted) as e:
            await pair.p.Prefill(worker_pb2.PrefillRequest(request=bad, destination=worker_pb2.KVHandle(
                address=pair.receiver.address)), FakeContext())
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.details
        assert pair.d.leases.get("bad") is None
        long_id = "x" * 70_000                 # the KV frames carry an id's length in 16 bits
        with pytest.raises(Aborted) as e:
            await pair.p.Prefill(worker_pb2.PrefillRequest(request=wreq(long_id, [5, 6], 4), destination=
                                 worker_pb2.KVHandle(address=pair.receiver.address)), FakeContext())
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.value.details
        await pair.idle()
    run(tiny, body)


def test_a_lease_reserved_by_decode_is_pending_until_the_kv_commits(tiny):
    prompt = random_prompts([20], VOCAB, seed=36)[0]

    async def body(pair):
        ctx = FakeContext()
        decode = asyncio.ensure_future(read_decode(pair.d, decode_request("p", prompt, 3), ctx))
        await asyncio.wait_for(ctx.sent_metadata.wait(), 10)
        assert pair.d.leases.get("p").state == LeaseState.PENDING
        resp = await pair.p.Prefill(pair.prefill_request("p", prompt, 3), FakeContext())
        assert len(await decode) == 2 and not resp.kv_fallback
        await pair.idle()
    run(tiny, body)
