"""Live migration between decode instances on real clusters: greedy tokens equal HF's whenever a
request moves, the stream never skips or repeats an index, and every abort path leaves the request
running and no block behind on either side."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from tandem.client import Client
from tandem.errors import NotFoundError
from tandem.local_cluster import LocalCluster
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy
from tests.integration.cluster_helpers import assert_no_leaks, worker_stats
from tests.integration.migration_helpers import (Stream, decode_reports, free_and_total, holder, other, set_state,
                                                 wait_router_sees, worker_migrate)

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 300
LENGTHS = [310, 40, 150, 17]
WORKER_ARGS = ["--dtype", "float32", "--num-blocks", "600", "--max-num-batched-tokens", "512"]
NO_RESCHEDULE = ["--no-reschedule"]


@pytest.fixture(scope="module")
def golden(export_named):
    model_dir = export_named("tiny")
    prompts = random_prompts(LENGTHS, 512, seed=23)
    return model_dir, prompts, [ids for ids, _ in hf_greedy(model_dir, prompts, MAX_TOKENS)]


def cluster(model_dir, redis_url, tmp_path, decode_args=(), router_args=NO_RESCHEDULE, decode=2):
    return LocalCluster(model_dir, prefill=1, decode=decode, redis_url=redis_url, worker_args=WORKER_ARGS,
                        role_args={"decode": list(decode_args)}, router_args=list(router_args), log_dir=str(tmp_path))


def background(address, prompts, n=6, max_tokens=MAX_TOKENS):
    """Streams that keep the decode instances busy (each decode step slower), ids bg-0.."""
    return [Stream(address, f"bg-{i}", prompts[i % len(prompts)], max_tokens) for i in range(n)]


def migrate_when(address, stream: Stream, at_index: int) -> dict | None:
    """Once the stream has `at_index` tokens, move it (admin API) to the other decode instance.
    None when the request finished first (this machine is fast and noisy; callers retry)."""
    assert stream.reached(at_index), "the request finished before the migration point"
    src = holder(address, stream.request_id)
    if src is None:
        return None
    with Client(address) as c:
        try:
            r = c.migrate(stream.request_id, other(address, src.instance_id).instance_id)
        except NotFoundError:              # it finished between holder() and the router's own lookup
            return None
    return None if r["abort_reason"] == "request_finished" else r


def migrated_stream(address, prompt, at_index: int, name: str, attempts: int = 4):
    """A stream migrated once it has `at_index` tokens: (stream, outcome). A request that finished
    before the move landed is let go and a fresh one tried."""
    for attempt in range(attempts):
        s = Stream(address, f"{name}-{attempt}", prompt, MAX_TOKENS)
        r = migrate_when(address, s, at_index)
        if r is not None:
            return s, r
        s.result()
    raise AssertionError(f"{name}: the request finished before its migration {attempts} times")


def test_migrations_at_several_moments_keep_hf_tokens(golden, redis_url, tmp_path):
    model_dir, prompts, expected = golden
    with cluster(model_dir, redis_url, tmp_path) as c:
        bg = background(c.address, prompts)
        moments = {"early": 2, "middle": MAX_TOKENS // 2, "late": MAX_TOKENS - 40}
        outcomes = {name: migrated_stream(c.address, prompts[0], at, f"m-{name}") for name, at in moments.items()}
        # one request moved twice, there and back
        twice, r1 = migrated_stream(c.address, prompts[2], 20, "m-twice")
        r2 = migrate_when(c.address, twice, 60)
        assert r2 is not None, "the request finished before its second move"
        for name, (s, r) in outcomes.items():
            assert r["committed"], (name, r)
            assert s.result() == expected[0], name
            moves = s.decode_instances()
            assert len(moves) == 2 and moves[1][0] == r["next_index"] and moves[0][1] != moves[1][1], (name, moves)
            assert r["next_index"] >= moments[name]
        assert outcomes["early"][1]["stages"] >= 2, "a 310-token request is pre-copied before its stop-and-copy"
        assert r1["committed"] and r2["committed"]
        assert twice.result() == expected[2]
        moves = twice.decode_instances()
        assert [i for i, _ in moves] == [0, r1["next_index"], r2["next_index"]]
        assert moves[0][1] == moves[2][1] != moves[1][1]
        for s in bg:
            assert s.result() == expected[int(s.request_id.split("-")[1]) % len(expected)]
        assert_no_leaks(c.address)


def test_stop_and_copy_only_and_too_many_stages(golden, redis_url, tmp_path):
    """A huge stop-and-copy threshold moves in one stage; a threshold of 0 never converges and
    aborts after --migration-max-stages, the request going on where it was."""
    model_dir, prompts, expected = golden
    with cluster(model_dir, redis_url, tmp_path / "one", ["--migration-stop-copy-blocks", "1000"]) as c:
        s, r = migrated_stream(c.address, prompts[0], 50, "one-stage")
        assert r["committed"] and r["stages"] == 1
        assert s.result() == expected[0]
        assert_no_leaks(c.address)
    with cluster(model_dir, redis_url, tmp_path / "never",
                 ["--migration-stop-copy-blocks", "0", "--migration-max-stages", "3"]) as c:
        bg = background(c.address, prompts, n=3)
        s, r = migrated_stream(c.address, prompts[0], 10, "never")
        assert not r["committed"] and r["abort_reason"] == "too_many_stages", r
        assert s.result() == expected[0]
        assert len(s.decode_instances()) == 1
        for b in bg:
            b.result()
        assert_no_leaks(c.address)


def test_destination_refusals_abort_cleanly(golden, redis_url, tmp_path):
    """Destination out of room (watermark), draining, or unreachable: the migration aborts with
    that reason, the request finishes with HF's tokens, nothing is left reserved anywhere."""
    model_dir, prompts, expected = golden
    with cluster(model_dir, redis_url, tmp_path, ["--migration-watermark", "0.99"]) as c:
        s = Stream(c.address, "oom", prompts[0], MAX_TOKENS)
        assert s.reached(5)
        src = holder(c.address, "oom")
        dst = other(c.address, src.instance_id)
        r = worker_migrate(src, dst.instance_id, dst.address, "oom")
        assert not r.committed and r.abort_reason == "dest_oom", r
        set_state(dst, "draining")
        r = worker_migrate(src, dst.instance_id, dst.address, "oom")
        assert not r.committed and r.abort_reason == "dest_refused", r
        set_state(dst, "serving")
        r = worker_migrate(src, "nobody", "127.0.0.1:1", "oom")
        assert not r.committed and r.abort_reason == "dest_unreachable", r
        assert s.result() == expected[0]
        assert len(s.decode_instances()) == 1
        assert_no_leaks(c.address)


# Pre-copy that never converges keeps a migration in flight for as long as we need.
ENDLESS = ["--migration-stop-copy-blocks", "0", "--migration-max-stages", "100000", "--migration-lease-ms", "3000"]


def start_endless(c, stream: Stream, results: list) -> tuple:
    assert stream.reached(5)
    src = holder(c.address, stream.request_id)
    dst = other(c.address, src.instance_id)
    def run():
        try:
            results.append(worker_migrate(src, dst.instance_id, dst.address, stream.request_id))
        except Exception as e:
            results.append(e)
    n = len(results)
    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while worker_stats(dst.address, False).reserved_blocks == 0:    # the destination holds the reservation
        assert len(results) == n, f"the migration ended before we saw it: {results[-1]}"
        assert time.monotonic() < deadline, "the migration never reserved on the destination"
        time.sleep(0.01)
    return src, dst, t


def test_aborts_during_a_stage(golden, redis_url, tmp_path):
    """The request finishes, or is cancelled, while a stage runs; the destination dies mid-way.
    Every time: the request's tokens are HF's (or it was cancelled), nothing leaks on the living."""
    model_dir, prompts, expected = golden
    with cluster(model_dir, redis_url, tmp_path, ENDLESS) as c:
        results: list = []
        s = Stream(c.address, "finishes", prompts[1], MAX_TOKENS)
        _, _, t = start_endless(c, s, results)
        assert s.result() == expected[1]
        t.join(60)
        assert not results[-1].committed and results[-1].abort_reason == "request_finished", results[-1]
        assert_no_leaks(c.address)

        s = Stream(c.address, "cancelled", prompts[1], MAX_TOKENS)
        _, dst, t = start_endless(c, s, results)
        s.cancel()
        t.join(60)
        assert not results[-1].committed and results[-1].abort_reason == "request_finished", results[-1]
        assert_no_leaks(c.address)

        s = Stream(c.address, "dest-dies", prompts[0], MAX_TOKENS)
        src, dst, t = start_endless(c, s, results)
        c.kill(dst.instance_id)
        t.join(60)
        assert not results[-1].committed, results[-1]
        assert results[-1].abort_reason in ("transfer_failed", "dest_unreachable"), results[-1]
        assert s.result() == expected[0]
        free, total, err = free_and_total(src)
        deadline = time.monotonic() + 30
        while free != total and time.monotonic() < deadline:
            time.sleep(0.2)
            free, total, err = free_and_total(src)
        assert (free, err) == (total, "")


def test_destination_frees_the_reservation_when_the_source_dies(golden, redis_url, tmp_path):
    """The source dies mid-migration: the destination's reservation runs out, and the router
    re-dispatches the request (router/request/redispatch.py), which goes on with HF's tokens."""
    model_dir, prompts, expected = golden
    with cluster(model_dir, redis_url, tmp_path, ENDLESS) as c:
        s = Stream(c.address, "source-dies", prompts[0], MAX_TOKENS)
        src, dst, t = start_endless(c, s, [])
        c.kill(src.instance_id)
        t.join(60)
        assert s.result() == expected[0]     # resumed on the survivor after the source died
        deadline = time.monotonic() + 30     # the 3 s migration lease runs out on the destination
        while True:
            st = worker_stats(dst.address)
            if st.reserved_blocks == 0 and st.free_blocks == st.total_blocks:
                break
            assert time.monotonic() < deadline, f"destination still holds {st.reserved_blocks} reserved blocks"
            time.sleep(0.2)
        assert st.integrity_error == ""


def test_drain_under_load_moves_every_request(golden, redis_url, tmp_path):
    """`tandem admin drain --wait` empties an instance while all requests keep HF's tokens; it then
    takes no new work until undone."""
    model_dir, prompts, expected = golden
    with cluster(model_dir, redis_url, tmp_path, router_args=[]) as c:
        streams = [Stream(c.address, f"d-{i}", prompts[i % len(prompts)], MAX_TOKENS) for i in range(10)]
        for s in streams:
            assert s.reached(3)
        victim = holder(c.address, "d-0")
        with Client(c.address) as client:
            r = client.drain(victim.instance_id, wait=True, timeout_s=120)
            assert r == {"state": "drained", "remaining": 0}
            late = Stream(c.address, "after-drain", prompts[3], 8)
            assert late.result() == expected[3][:8]
            assert late.decode_instances()[0][1] != victim.instance_id
        moved = 0
        for i, s in enumerate(streams):
            assert s.result() == expected[i % len(prompts)], s.request_id
            moved += len(s.decode_instances()) > 1
        assert moved >= 1
        deadline = time.monotonic() + 10      # the record shows it within a heartbeat
        while decode_reports(c.address)[victim.instance_id].state != "drained":
            assert time.monotonic() < deadline, "the instance's record never said drained"
            time.sleep(0.2)
        assert health(victim.address) == ("SERVING", "NOT_SERVING")     # alive, not ready: removed first
        with Client(c.address) as client:
            assert client.drain(victim.instance_id, undo=True)["state"] == "serving"
        assert health(victim.address) == ("SERVING", "SERVING")
        assert_no_leaks(c.address)


def health(address: str) -> tuple[str, str]:
    """(liveness, readiness) as the chart's probes see them: services "" and tandem.v1.Worker."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return tuple(health_pb2.HealthCheckResponse.ServingStatus.Name(
            stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status) for svc in ("", "tandem.v1.Worker"))


def test_rescheduler_balances_onto_an_instance_that_joins(golden, redis_url, tmp_path):
    """All requests start on one decode instance (the other is draining); once it serves again the
    rescheduler's balance policy moves some of them over, tokens unchanged."""
    model_dir, prompts, expected = golden
    with cluster(model_dir, redis_url, tmp_path, router_args=["--reschedule-interval-ms", "50"]) as c:
        reports = decode_reports(c.address)
        idle = reports["decode-1"]
        set_state(idle, "draining")
        wait_router_sees(c.address, idle.instance_id, "draining", "drained")   # empty: drained at once
        streams = [Stream(c.address, f"b-{i}", prompts[i % len(prompts)], MAX_TOKENS) for i in range(8)]
        for s in streams:
            assert s.reached(2)
        set_state(idle, "serving")
        for i, s in enumerate(streams):
            assert s.result() == expected[i % len(prompts)]
        landed = [s for s in streams if any(inst == "decode-1" for _, inst in s.decode_instances())]
        assert landed, "no request moved to the idle instance"
        assert_no_leaks(c.address)


def test_preemption_on_the_source_aborts_the_migration(golden, redis_url, tmp_path):
    """Two long requests outgrow the source's 60 blocks while the newer one is being pre-copied:
    the source preempts it, the migration aborts (its copied KV is void), the destination frees its
    reservation, and both requests still produce HF's tokens (the preempted one recomputes)."""
    model_dir, prompts, expected = golden
    args = ENDLESS + ["--num-blocks", "60"]
    with cluster(model_dir, redis_url, tmp_path, args) as c:
        reports = decode_reports(c.address)
        src, dst = reports["decode-0"], reports["decode-1"]
        set_state(dst, "draining")               # both requests land on the source
        wait_router_sees(c.address, dst.instance_id, "draining", "drained")
        old = Stream(c.address, "old", prompts[0], MAX_TOKENS)
        assert old.reached(1)
        new = Stream(c.address, "new", prompts[0], MAX_TOKENS)
        assert new.reached(1)
        set_state(dst, "serving")
        result = worker_migrate(src, dst.instance_id, dst.address, "new")
        assert not result.committed and result.abort_reason == "request_preempted", result
        assert old.result() == expected[0] and new.result() == expected[0]
        assert_no_leaks(c.address)


def test_autoscaler_drain_empties_a_real_decode_instance(golden, redis_url, tmp_path):
    """The autoscaler's drain_instance (router/autoscale/drain.py) against a real router and
    workers: the requests move, the instance ends drained, the callable answers True."""
    import asyncio

    from router.autoscale.drain import AdminDrain

    model_dir, prompts, expected = golden
    with cluster(model_dir, redis_url, tmp_path, router_args=[]) as c:
        streams = [Stream(c.address, f"a-{i}", prompts[i % len(prompts)], MAX_TOKENS) for i in range(6)]
        for s in streams:
            assert s.reached(3)
        victim = holder(c.address, "a-0")

        async def drain():
            d = AdminDrain(c.address, timeout_s=120)
            try:
                return await d(victim.instance_id)
            finally:
                await d.close()
        assert asyncio.run(drain()) is True
        for i, s in enumerate(streams):
            assert s.result() == expected[i % len(prompts)]
        assert_no_leaks(c.address)
