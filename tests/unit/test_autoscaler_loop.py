"""The autoscaler controller: acts only while leading, drains before removing a decode replica,
keeps the replica when the drain fails, survives API errors without a traceback loop, and drives
the real kubernetes client against the local scale-subresource server end to end."""
from __future__ import annotations

import asyncio
import logging

import pytest

from router.autoscale.autoscaler import AutoscalerConfig, Bounds, Pool
from router.autoscale.loop import Autoscaler
from router.autoscale.k8s_scaler import (DeploymentScaler, ScaleConflict, ScalePermissionDenied,
                                         load_api_client)
from tandem.v1 import worker_pb2
from tests.unit.test_k8s_scaler import NS, FakeApiServer, write_kubeconfig
from tests.aio import run

P, D = worker_pb2.ROLE_PREFILL, worker_pb2.ROLE_DECODE
CFG = AutoscalerConfig(prefill=Bounds(1, 4), decode=Bounds(1, 4), scale_up_cooldown_s=30,
                       scale_down_cooldown_s=300, scale_down_stabilization_s=300)
DEPLOYMENTS = {Pool.PREFILL: "tandem-prefill", Pool.DECODE: "tandem-decode"}


def rec(iid, role=D, state="serving", used=0, **kw):
    return worker_pb2.LoadReport(instance_id=iid, role=role, state=state, total_blocks=1000,
                                 free_blocks=1000 - used, **kw)


IDLE = [rec("p1", P), rec("p2", P), rec("d1", used=20, running=2), rec("d2", used=5, running=1),
        rec("d3", used=50, running=4)]
BUSY = [rec("p1", P, queued_prefill_tokens=8000, prefill_tokens_per_s=1000.0),
        rec("d1", used=950, running=95)]


class Leader:
    def __init__(self, leading=True):
        self.is_leader = leading


class Clock:
    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def __call__(self):
        return self.now

    async def sleep(self, s):
        self.slept.append(s)
        self.now += s
        await asyncio.sleep(0)


class Scaler:
    """Synchronous like DeploymentScaler; `errors` maps a method name to an exception to raise."""

    def __init__(self, **replicas):
        self.replicas = dict(replicas)
        self.calls, self.errors = [], {}

    def get_replicas(self, name):
        self.calls.append(("get", name))
        if "get" in self.errors:
            raise self.errors["get"]
        return self.replicas[name]

    def set_replicas(self, name, replicas, *, expected=None):
        self.calls.append(("set", name, replicas, expected))
        if "set" in self.errors:
            raise self.errors["set"]
        self.replicas[name] = replicas
        return replicas

    def sets(self):
        return [c[1:] for c in self.calls if c[0] == "set"]


class Drain:
    def __init__(self, result=True):
        self.result, self.calls = result, []

    async def __call__(self, instance_id):
        self.calls.append(instance_id)
        if isinstance(self.result, BaseException):
            raise self.result
        if self.result == "hang":
            await asyncio.Event().wait()
        return self.result


def make(loads, scaler, leader=None, drain=None, clock=None, **kw):
    clock = clock or Clock()
    a = Autoscaler(CFG, deployments=DEPLOYMENTS, scaler=scaler, loads=lambda: loads,
                   leader=leader or Leader(), drain_instance=drain or Drain(), interval_s=15.0,
                   drain_settle_s=12.0, clock=clock, sleep=clock.sleep, **kw)
    return a, clock


@run
async def test_does_nothing_unless_leading():
    scaler = Scaler(**{"tandem-prefill": 1, "tandem-decode": 1})
    a, _ = make(BUSY, scaler, leader=Leader(False))
    assert await a.tick() is None
    assert scaler.calls == []


@run
async def test_scales_up_with_the_count_it_decided_from():
    scaler = Scaler(**{"tandem-prefill": 1, "tandem-decode": 1})
    a, _ = make(BUSY, scaler)
    d = await a.tick()
    assert d.prefill.target > 1 and d.decode.target > 1
    assert scaler.sets() == [("tandem-prefill", d.prefill.target, 1),
                             ("tandem-decode", d.decode.target, 1)]


@run
async def test_decode_scale_down_drains_the_least_loaded_first_then_waits_then_scales():
    scaler = Scaler(**{"tandem-prefill": 2, "tandem-decode": 3})
    drain = Drain(True)
    a, clock = make(IDLE, scaler, drain=drain)
    await a.tick()                                   # a new leader: waits the stabilization
    assert scaler.sets() == [] and drain.calls == []
    clock.now += 300
    d = await a.tick()
    assert d.decode.drain == "d2" and drain.calls == ["d2"]
    assert 12.0 in clock.slept                       # settle time between drain and scale
    assert ("tandem-decode", 2, 3) in scaler.sets()
    assert ("tandem-prefill", 1, 2) in scaler.sets()


@pytest.mark.parametrize("result", [False, RuntimeError("migration refused"), "hang"])
def test_a_failed_drain_keeps_the_replica_and_waits_a_cooldown(result, caplog):
    async def body():
        scaler = Scaler(**{"tandem-prefill": 1, "tandem-decode": 3})
        drain = Drain(result)
        a, clock = make(IDLE, scaler, drain=drain, drain_timeout_s=0.05)
        await a.tick()
        clock.now += 300
        await a.tick()
        assert drain.calls == ["d2"] and scaler.sets() == []
        clock.now += 299
        await a.tick()
        assert drain.calls == ["d2"]                 # no new try within the cooldown
        clock.now += 1
        await a.tick()
        assert drain.calls == ["d2", "d2"]
    with caplog.at_level(logging.WARNING, logger="router.autoscale.loop"):
        asyncio.run(body())
    assert any("keeping the replica" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


@run
async def test_losing_leadership_during_the_drain_stops_the_scale_down():
    scaler = Scaler(**{"tandem-prefill": 1, "tandem-decode": 3})
    leader = Leader()

    async def drain_and_lose(instance_id):
        leader.is_leader = False
        return True
    a, clock = make(IDLE, scaler, leader=leader, drain=drain_and_lose)
    await a.tick()
    clock.now += 300
    await a.tick()
    assert scaler.sets() == []
    assert await a.tick() is None and a.state is None


@run
async def test_a_new_leader_starts_with_fresh_cooldowns():
    scaler = Scaler(**{"tandem-prefill": 1, "tandem-decode": 3})
    leader = Leader()
    a, clock = make(IDLE, scaler, leader=leader)
    await a.tick()
    clock.now += 299
    leader.is_leader = False
    await a.tick()
    leader.is_leader = True
    clock.now += 1
    await a.tick()                                   # leads again: the 300 s start over
    assert scaler.sets() == []


def test_api_errors_are_logged_once_and_retried(caplog):
    async def body():
        scaler = Scaler(**{"tandem-prefill": 1, "tandem-decode": 1})
        scaler.errors["get"] = ScalePermissionDenied("forbidden to read deployments/scale")
        a, clock = make(BUSY, scaler)
        for _ in range(5):
            assert await a.tick() is None
            clock.now += 15
        del scaler.errors["get"]
        scaler.errors["set"] = ScaleConflict("has 2 replicas, not the 1")
        d = await a.tick()
        assert d is not None and scaler.replicas == {"tandem-prefill": 1, "tandem-decode": 1}
        del scaler.errors["set"]
        clock.now += 15
        await a.tick()                               # not recorded as done: tried again at once
        assert scaler.replicas["tandem-prefill"] > 1
    with caplog.at_level(logging.INFO, logger="router.autoscale.loop"):
        asyncio.run(body())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("ScalePermissionDenied" in w for w in warnings) == 1
    assert sum("ScaleConflict" in w for w in warnings) == 1
    assert any("working again" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


@run
async def test_the_loop_ticks_until_stopped():
    scaler = Scaler(**{"tandem-prefill": 1, "tandem-decode": 1})
    a, clock = make(BUSY, scaler)
    a.start()
    with pytest.raises(RuntimeError):
        a.start()
    while len(clock.slept) < 3:
        await asyncio.sleep(0)
    await a.stop()
    await a.stop()
    assert clock.slept[:3] == [15.0, 15.0, 15.0]
    assert scaler.calls.count(("get", "tandem-decode")) >= 3


def test_constructor_checks():
    with pytest.raises(ValueError, match="decode"):
        Autoscaler(CFG, deployments={Pool.PREFILL: "p"}, scaler=Scaler(), loads=list,
                   leader=Leader(), drain_instance=Drain())
    with pytest.raises(ValueError, match="interval_s"):
        Autoscaler(CFG, deployments=DEPLOYMENTS, scaler=Scaler(), loads=list, leader=Leader(),
                   drain_instance=Drain(), interval_s=0)


def test_end_to_end_with_the_kubernetes_client(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeApiServer() as api:
        api.add("tandem-prefill", 2)
        api.add("tandem-decode", 3)
        client = load_api_client(write_kubeconfig(tmp_path / "kubeconfig", api.url), retries=0)
        scaler = DeploymentScaler(client, NS, timeout_s=5.0)

        async def body():
            drain = Drain(True)
            a, clock = make(IDLE, scaler, drain=drain)
            await a.tick()
            clock.now += 300
            await a.tick()
            assert drain.calls == ["d2"]
            assert api.deployments[(NS, "tandem-decode")]["replicas"] == 2
            assert api.deployments[(NS, "tandem-prefill")]["replicas"] == 1
            # RBAC revoked: a 403 on the next change is logged, nothing breaks.
            a._loads = lambda: BUSY
            api.fail = [("PATCH", 403)] * 4
            clock.now += 15
            assert await a.tick() is not None
            assert api.deployments[(NS, "tandem-prefill")]["replicas"] == 1
        with caplog.at_level(logging.WARNING, logger="router.autoscale.loop"):
            asyncio.run(body())
    assert any("HTTP 403" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


def test_a_failing_tick_is_logged_once_with_its_traceback_and_the_loop_goes_on(caplog):
    async def body():
        calls = []

        def broken_loads():
            calls.append(1)
            raise KeyError("bug")
        scaler = Scaler(**{"tandem-prefill": 1, "tandem-decode": 1})
        a, clock = make([], scaler)
        a._loads = broken_loads
        a.start()
        while len(calls) < 4:
            await asyncio.sleep(0)
        await a.stop()
    with caplog.at_level(logging.WARNING, logger="router.autoscale.loop"):
        asyncio.run(body())
    failures = [r for r in caplog.records if "tick failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info
