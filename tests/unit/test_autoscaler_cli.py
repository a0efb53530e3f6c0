"""The router's --autoscale flags, their validation, and serve_with_autoscaler wiring a router's
registry and leader lock to the kubernetes client (against the local scale-subresource server)."""
from __future__ import annotations

import argparse
import asyncio

import pytest

import router.__main__ as router_main
from router.autoscale.autoscaler import Band, Bounds, Pool
from router.autoscale.cli import (AutoscalerSetupError, add_autoscaler_args, autoscaler_settings,
                                  local_address, serve_with_autoscaler)
from tests.unit.test_k8s_scaler import NS, FakeApiServer, write_kubeconfig

REQUIRED = ["--autoscale", "--autoscale-prefill-deployment=tandem-prefill",
            "--autoscale-decode-deployment=tandem-decode"]


def parse(argv):
    p = argparse.ArgumentParser(prog="router")
    p.add_argument("--redis", dest="redis_url", default="redis://r:6379/0")
    p.add_argument("--cluster", default="c1")
    add_autoscaler_args(p)
    return autoscaler_settings(p, p.parse_args(argv))


def test_off_by_default():
    assert parse([]) is None


def test_flags_become_settings():
    s = parse(REQUIRED + [
        "--autoscale-namespace=prod", "--autoscale-kubeconfig=/k", "--autoscale-interval-s=5",
        "--autoscale-ttft-slo-s=1.5", "--autoscale-tpot-slo-s=0.05",
        "--autoscale-prefill-min=2", "--autoscale-prefill-max=10",
        "--autoscale-decode-min=3", "--autoscale-decode-max=12",
        "--autoscale-kv-band=0.3,0.6,0.8", "--autoscale-queue-band=0.05,0.2,0.5",
        "--autoscale-tpot-band=0.3,0.6,0.95", "--autoscale-up-cooldown-s=10",
        "--autoscale-down-cooldown-s=120", "--autoscale-down-stabilization-s=240",
        "--autoscale-drain-timeout-s=90", "--autoscale-drain-settle-s=0"])
    c = s.config
    assert s.deployments == {Pool.PREFILL: "tandem-prefill", Pool.DECODE: "tandem-decode"}
    assert (s.namespace, s.kubeconfig, s.interval_s, s.drain_timeout_s, s.drain_settle_s) == (
        "prod", "/k", 5.0, 90.0, 0.0)
    assert (s.redis_url, s.cluster) == ("redis://r:6379/0", "c1")
    assert (c.ttft_slo_s, c.tpot_slo_s) == (1.5, 0.05)
    assert (c.prefill, c.decode) == (Bounds(2, 10), Bounds(3, 12))
    assert (c.kv, c.queue, c.tpot) == (Band(0.3, 0.6, 0.8), Band(0.05, 0.2, 0.5),
                                       Band(0.3, 0.6, 0.95))
    assert (c.scale_up_cooldown_s, c.scale_down_cooldown_s, c.scale_down_stabilization_s) == (
        10, 120, 240)


@pytest.mark.parametrize("argv, message", [
    (["--autoscale"], "--autoscale-prefill-deployment and --autoscale-decode-deployment"),
    (REQUIRED + ["--autoscale-decode-min=5", "--autoscale-decode-max=2"], "decode replicas"),
    (REQUIRED + ["--autoscale-prefill-min=0"], "prefill replicas"),
    (REQUIRED + ["--autoscale-kv-band=0.9,0.7,0.8"], "kv band"),
    (REQUIRED + ["--autoscale-kv-band=0.5,0.7"], "DOWN,TARGET,UP"),
    (REQUIRED + ["--autoscale-ttft-slo-s=0"], "ttft_slo_s"),
    (REQUIRED + ["--autoscale-interval-s=0"], "--autoscale-interval-s"),
    (REQUIRED + ["--autoscale-drain-settle-s=-1"], "--autoscale-drain-settle-s"),
])
def test_bad_values_exit_2_saying_what_to_change(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_local_address():
    assert local_address("0.0.0.0:50051") == "127.0.0.1:50051"
    assert local_address("[::]:7") == "127.0.0.1:7"
    assert local_address("10.1.2.3:50051") == "10.1.2.3:50051"


class FakeRegistry:
    def all(self):
        return []


class FakeRouter:
    def __init__(self, leader):
        self.leader, self.registry = leader, FakeRegistry()
        self.address, self.port = "127.0.0.1:50051", 50051


class Leading:
    is_leader = True


def test_serve_with_autoscaler_runs_beside_serve_and_stops_after(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeApiServer() as api:
        api.add("tandem-prefill", 0)              # below min: the first tick raises it
        api.add("tandem-decode", 1)
        settings = parse(REQUIRED + [f"--autoscale-namespace={NS}",
                                     f"--autoscale-kubeconfig={write_kubeconfig(tmp_path / 'kc', api.url)}"])
        served = []

        async def serve(router):
            served.append(router)
            while api.deployments[(NS, "tandem-prefill")]["replicas"] != 1:
                await asyncio.sleep(0.01)

        router = FakeRouter(Leading())
        asyncio.run(asyncio.wait_for(serve_with_autoscaler(router, settings, serve), 30))
        assert served == [router]
        assert [m for m, *_ in api.log][:3] == ["GET", "GET", "GET"]   # both counts, then CAS
        assert api.deployments[(NS, "tandem-decode")]["replicas"] == 1


def test_no_credentials_stop_the_router_before_it_serves(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    built = []

    class Router:
        def __init__(self, *args, **kw):
            built.append(kw)
            self.leader, self.registry, self.port, self.address = Leading(), FakeRegistry(), 1, ""

    async def serve(router):
        raise AssertionError("must not serve without credentials")

    monkeypatch.setattr(router_main, "Router", Router)
    monkeypatch.setattr(router_main, "serve", serve)
    rc = router_main.main(["--redis=redis://127.0.0.1:1/0", *REQUIRED,
                           f"--autoscale-kubeconfig={tmp_path / 'missing'}"])
    assert rc == 2 and built
    err = capsys.readouterr().err
    assert "tandem router: cannot load Kubernetes credentials" in err
    assert "--autoscale-kubeconfig" in err
