"""The router's request path (Dispatcher, Redispatcher, OutputsHub) against scripted in-process
workers: real gRPC servers whose Generate/Decode/Prefill/Recompute/Release answer as each test
says, with or without the router's Outputs streams. Each test checks the exact calls the workers
saw: a full instance refusing, a client cancel, a worker dying mid-stream, a migration, a KV that
did not move (recomputed on the decode instance). No cluster, no Redis: well under a second each."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from router.request.dispatch import Dispatcher, RoutedRequest
from router.request.redispatch import Redispatcher
from services.engine.sampling_params import SamplingParams
from services.worker.call_metadata import RESERVED_KEY
from services.worker.output_sinks import OutputSinks
from services.worker_pool import WorkerPool
from tandem.v1 import serving_pb2, worker_pb2, worker_pb2_grpc
from tests.aio import run, serve_worker

pytestmark = pytest.mark.timeout(60)
FIRST_TOKEN = 100          # output index i is token FIRST_TOKEN + i on every fake


@dataclasses.dataclass
class Script:
    """What a fake instance does with a request stream (Generate, or Decode after a migration)."""
    refuse: grpc.StatusCode | None = None     # abort before any token
    total: int = 6                            # the request's output length (finishes at this index)
    die_after: int | None = None              # abort UNAVAILABLE once this many outputs exist
    migrate_after: int | None = None          # end with `migrated` to `migrate_to` at this index
    migrate_to: "Fake | None" = None
    hold_after: int | None = None             # stop sending at this index until cancelled
    role: int = worker_pb2.ROLE_COLOCATED
    kv_fallback: str = ""                     # a prefill instance's answer: the KV did not move


class Fake(worker_pb2_grpc.WorkerServicer):
    def __init__(self, instance_id: str, calls: list, script: Script):
        self.instance_id, self.calls, self.script = instance_id, calls, script
        self.outputs = OutputSinks()
        self.cancelled: list[str] = []
        self.address = ""
        self.adopted = asyncio.Event()          # a reserved request's KV arrived (here: Recompute)
        self.holds: list[worker_pb2.RunningRequest] = []      # what Stats lists (parked requests)

    def _record(self, method: str, rid: str, **detail) -> None:
        self.calls.append((self.instance_id, method, rid, detail))

    async def _tokens(self, rid: str, start: int, context):
        s = self.script
        if s.refuse is not None:
            await context.abort(s.refuse, f"scripted {s.refuse.name}")
        try:
            for i in range(start, s.total):
                if s.hold_after is not None and i >= s.hold_after:
                    await asyncio.Event().wait()
                if s.die_after is not None and i >= s.die_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted death")
                if s.migrate_after is not None and i >= s.migrate_after:
                    dest = s.migrate_to
                    yield worker_pb2.TokenChunk(index=i, migrated=worker_pb2.Migrated(
                        instance_id=dest.instance_id, address=dest.address, next_index=i))
                    return
                yield worker_pb2.TokenChunk(index=i, token_ids=[FIRST_TOKEN + i], finished=i == s.total - 1,
                                            finish_reason=serving_pb2.FINISH_REASON_LENGTH if i == s.total - 1 else 0)
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise

    async def Generate(self, request, context):
        start = len(request.output_token_ids)
        self._record("Generate", request.request_id, resumed=list(request.output_token_ids))
        async for chunk in self.outputs.relay(self._tokens(request.request_id, start, context), context,
                                              request.request_id):
            yield chunk

    async def Prefill(self, request, context):
        self._record("Prefill", request.request.request_id, to=request.destination.instance_id)
        return worker_pb2.PrefillResponse(first_token_id=FIRST_TOKEN, kv_fallback=self.script.kv_fallback)

    async def Recompute(self, request, context):
        self._record("Recompute", request.request_id, first=request.first_token_id)
        self.adopted.set()
        return worker_pb2.RecomputeResponse()

    async def Decode(self, request, context):
        self._record("Decode", request.request_id, start=request.start_index, reserves=request.HasField("request"))
        if request.HasField("request"):     # reserve, say so, and wait for the KV (or its recompute)
            await context.send_initial_metadata(((RESERVED_KEY, "1"),))
            await self.adopted.wait()
        async for chunk in self.outputs.relay(self._tokens(request.request_id, request.start_index, context),
                                              context, request.request_id):
            yield chunk

    async def Stats(self, request, context):
        return worker_pb2.LoadReport(instance_id=self.instance_id, requests=self.holds)

    async def Release(self, request, context):
        self._record("Release", request.request_id)
        return worker_pb2.ReleaseResponse(found=True)

    async def Outputs(self, request, context):
        sink = self.outputs.open(request.id)
        try:
            await context.send_initial_metadata(())
            while chunks := await sink.take():
                yield worker_pb2.OutputBatch(chunks=chunks)
        finally:
            self.outputs.close(sink)


class Registry:
    """The part of InstanceRegistry the dispatcher reads: the instances' last reports."""
    poll_interval_s = 0.05

    def __init__(self, reports: list[worker_pb2.LoadReport]):
        self.reports = {r.instance_id: r for r in reports}
        self.unreachable: list[str] = []

    def instances(self, role=None):
        return [r for i, r in self.reports.items() if i not in self.unreachable and (role is None or r.role == role)]

    def get(self, instance_id):
        return None if instance_id in self.unreachable else self.reports.get(instance_id)

    def mark_unreachable(self, instance_id):
        self.unreachable.append(instance_id)


class Bench:
    """Fakes `scripts` (instance id → Script) served on real ports, and a Dispatcher over them; the
    first id is the freest, so placement tries it first."""

    def __init__(self, scripts: dict[str, Script], outputs: bool):
        self.calls: list = []
        self.fakes = {i: Fake(i, self.calls, s) for i, s in scripts.items()}
        self.outputs = outputs

    async def __aenter__(self):
        self.servers = []
        for fake in self.fakes.values():
            server, fake.address = await serve_worker(fake)
            self.servers.append(server)
        reports = [worker_pb2.LoadReport(instance_id=i, address=f.address, role=f.script.role,
                                         home_role=f.script.role, state="serving", block_size=16,
                                         total_blocks=100, free_blocks=100 - k, kv_transport="tcp",
                                         kv_address=f.address)
                   for k, (i, f) in enumerate(self.fakes.items())]
        self.registry = Registry(reports)
        self.pool = WorkerPool()
        self.dispatcher = Dispatcher(self.registry, self.pool, queue_timeout_s=1.0)
        if self.outputs:
            self.dispatcher.outputs.watch({f.address for f in self.fakes.values()})
            deadline = time.monotonic() + 10
            while not all(len(f.outputs) for f in self.fakes.values()):
                assert time.monotonic() < deadline, "the fakes never saw the router's Outputs streams"
                await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc):
        await self.dispatcher.outputs.close()
        await self.pool.close()
        for server in self.servers:
            await server.stop(None)

    def streams(self) -> list[tuple[str, str, dict]]:
        """The stream calls the fakes saw, in order: (instance, method, detail)."""
        return [(i, m, d) for i, m, _, d in self.calls if m in ("Generate", "Decode")]

    def methods(self) -> list[tuple[str, str]]:
        """Every call the fakes saw but Release (fire-and-forget, unordered): (instance, method)."""
        return [(i, m) for i, m, _, _ in self.calls if m != "Release"]

    def releases(self) -> set[str]:
        return {i for i, m, _, _ in self.calls if m == "Release"}

    async def released(self, instance_id: str) -> None:
        deadline = time.monotonic() + 5
        while instance_id not in self.releases():       # Release is fire-and-forget
            assert time.monotonic() < deadline, f"{instance_id} never got a Release"
            await asyncio.sleep(0.01)


def request(rid: str = "r") -> RoutedRequest:
    wr = worker_pb2.WorkerRequest(request_id=rid, prompt_token_ids=[1, 2, 3],
                                  params=serving_pb2.SamplingParams(max_tokens=16))
    return RoutedRequest(rid, [1, 2, 3], SamplingParams(max_tokens=16), wr, time.monotonic())


async def tokens_of(stream) -> list[int]:
    out = []
    async for message in stream:
        assert message.index == len(out)
        out += message.token_ids
    return out


both_paths = pytest.mark.parametrize("outputs", [False, True], ids=["own-streams", "outputs-stream"])


@both_paths
@run
async def test_a_full_instance_refuses_and_the_next_one_serves(outputs):
    async with Bench({"a": Script(refuse=grpc.StatusCode.RESOURCE_EXHAUSTED), "b": Script(total=5)}, outputs) as b:
        assert await tokens_of(b.dispatcher.generate(request())) == [100, 101, 102, 103, 104]
        assert [(i, m) for i, m, _ in b.streams()] == [("a", "Generate"), ("b", "Generate")]
        await b.released("a")               # the refused call is released too; the finished one is not
        assert "b" not in b.releases()
        assert b.dispatcher.outputs.followers == 0


@both_paths
@run
async def test_a_client_cancel_mid_stream_cancels_the_call_and_releases(outputs):
    async with Bench({"a": Script(total=10, hold_after=3)}, outputs) as b:
        rr = request()
        got = []
        stream = b.dispatcher.generate(rr)
        with pytest.raises(asyncio.CancelledError):
            async for message in stream:
                got += message.token_ids
                if len(got) == 3:
                    rr.abort()               # the Abort RPC's path
        assert got == [100, 101, 102]
        await b.released("a")
        deadline = time.monotonic() + 5
        while b.fakes["a"].cancelled != ["r"]:
            assert time.monotonic() < deadline, "the worker's stream was never cancelled"
            await asyncio.sleep(0.01)
        assert b.dispatcher.outputs.followers == 0


@both_paths
@run
async def test_a_worker_dying_mid_stream_resumes_elsewhere_with_the_tokens_delivered(outputs):
    async with Bench({"a": Script(total=10, die_after=4), "b": Script(total=10)}, outputs) as b:
        reasons = []
        redispatcher = Redispatcher(b.dispatcher, on_redispatch=reasons.append)
        assert await tokens_of(redispatcher.generate(request())) == list(range(100, 110))
        (a, _, first), (b_, _, resumed) = b.streams()
        assert (a, first["resumed"], b_) == ("a", [], "b")
        # b recomputes what the client had: all 4 tokens on a's own stream; through the Outputs stream
        # the death may overtake the last of them, which b then computes again
        had = resumed["resumed"]
        if outputs:
            assert had == list(range(100, 100 + len(had))) and len(had) <= 4
        else:
            assert had == [100, 101, 102, 103]
        assert reasons == ["decode_lost"] and b.registry.unreachable == ["a"]


@both_paths
@run
async def test_a_migrated_request_goes_on_from_the_next_index_on_the_destination(outputs):
    scripts = {"a": Script(total=8, migrate_after=3), "b": Script(total=8)}
    async with Bench(scripts, outputs) as b:
        scripts["a"].migrate_to = b.fakes["b"]
        assert await tokens_of(b.dispatcher.generate(request())) == list(range(100, 108))
        assert [(i, m, d.get("start")) for i, m, d in b.streams()] == [("a", "Generate", None), ("b", "Decode", 3)]
        assert not b.releases()             # it finished where it moved: nothing to free


@both_paths
@run
async def test_a_kv_that_did_not_move_is_recomputed_on_the_decode_instance(outputs):
    scripts = {"p": Script(role=worker_pb2.ROLE_PREFILL, kv_fallback="scripted: the KV transfer failed"),
               "d": Script(role=worker_pb2.ROLE_DECODE, total=6)}
    async with Bench(scripts, outputs) as b:
        rr = request()
        assert await tokens_of(b.dispatcher.generate(rr)) == list(range(100, 106))
        # P and D start together (either may be first), then D recomputes, then D's tokens from index 1
        assert sorted(b.methods()[:2]) == [("d", "Decode"), ("p", "Prefill")]
        assert b.methods()[2:] == [("d", "Recompute")]
        (_, _, decode), = b.streams()
        assert (decode["start"], decode["reserves"]) == (1, True)
        assert rr.kv_fallback == "scripted: the KV transfer failed"
        assert not b.releases()


def resumed(rid: str, delivered: list[int]) -> RoutedRequest:
    rr = request(rid)
    rr.resume_token_ids = list(delivered)
    return rr


async def tokens_from(stream, start: int) -> list[int]:
    out = []
    async for message in stream:
        assert message.index == start + len(out)
        out += message.token_ids
    return out


def parked(rid: str, outputs: int) -> worker_pb2.RunningRequest:
    return worker_pb2.RunningRequest(request_id=rid, num_output_tokens=outputs, running=True, parked=True)


@both_paths
@run
async def test_a_resumed_request_attaches_to_the_newest_parked_attempt_and_releases_the_rest(outputs):
    """Its router died: instance a parked the first attempt, b a re-dispatched one (r~r1); the
    client resumes at index 4 on a new router, which attaches to r~r1 on b and releases r on a."""
    async with Bench({"a": Script(total=10), "b": Script(total=10)}, outputs) as b:
        b.fakes["a"].holds = [parked("r", 7)]
        b.fakes["b"].holds = [parked("r~r1", 8), parked("other", 3)]
        redispatcher = Redispatcher(b.dispatcher)
        assert await tokens_from(redispatcher.generate(resumed("r", range(100, 104))), 4) == list(range(104, 110))
        assert b.streams() == [("b", "Decode", {"start": 4, "reserves": False})]
        assert [c[2] for c in b.calls if c[1] == "Decode"] == ["r~r1"]
        await b.released("a")
        assert {(i, rid) for i, m, rid, _ in b.calls if m == "Release"} == {("a", "r")}


@both_paths
@run
async def test_a_resumed_request_no_instance_holds_is_recomputed_under_a_new_attempt_id(outputs):
    async with Bench({"a": Script(total=10)}, outputs) as b:
        redispatcher = Redispatcher(b.dispatcher)
        assert await tokens_from(redispatcher.generate(resumed("r", range(100, 103))), 3) == list(range(103, 110))
        assert [(i, m, rid) for i, m, rid, _ in b.calls if m == "Generate"] == [("a", "Generate", "r~r1")]
        assert b.streams()[0][2]["resumed"] == [100, 101, 102]


@run
async def test_a_resume_waits_for_a_running_attempt_to_be_parked():
    """The old router's stream may not have closed on the worker yet: the new router probes again
    until the attempt shows as parked (or the wait ends), instead of recomputing at once."""
    async with Bench({"a": Script(total=10)}, False) as b:
        fake = b.fakes["a"]
        fake.holds = [worker_pb2.RunningRequest(request_id="r", num_output_tokens=5, running=True)]
        asyncio.get_running_loop().call_later(0.3, lambda: fake.holds.__setitem__(0, parked("r", 6)))
        redispatcher = Redispatcher(b.dispatcher)
        assert await tokens_from(redispatcher.generate(resumed("r", range(100, 105))), 5) == list(range(105, 110))
        assert b.streams() == [("a", "Decode", {"start": 5, "reserves": False})]
