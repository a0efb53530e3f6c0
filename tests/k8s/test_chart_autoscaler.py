"""The chart's autoscaler wiring: values → router flags that the real router CLI accepts, the
Deployments it scales are the ones its Role allows, their replica counts left to it, the schema
and template checks, and the autoscaled example valid and lint-clean."""
from __future__ import annotations

import copy

import pytest

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go SDK for Python) is not installed")
import kubernetes_validate  # noqa: E402

from k8s import render as chart_render  # noqa: E402
from router.autoscale.autoscaler import Band, Bounds, Pool  # noqa: E402
from tests.k8s.test_chart import (K8S_VERSIONS, _container_env, _expand, by_kind_name,  # noqa: E402
                                  example, objects)

ON = {"autoscaler": {"enabled": True}}


def router_container(objs):
    return objs[("Deployment", "tandem-router")]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_autoscaled_example_validates_strict(k8s_version):
    for obj in objects(example("gpu-autoscale")):
        assert kubernetes_validate.validate(obj, k8s_version, strict=True)


def test_autoscaled_example_lint_clean():
    report = helm.lint(chart_render.CHART, example("gpu-autoscale"), strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_off_by_default_no_flags():
    args = router_container(by_kind_name(objects()))["args"]
    assert not [a for a in args if a.startswith("--autoscale")]


@pytest.mark.parametrize("case", ["defaults", "example"])
def test_router_flags_parse_into_the_values(case, monkeypatch):
    import router.__main__ as router_main

    values = copy.deepcopy(ON) if case == "defaults" else example("gpu-autoscale")
    seen = {}

    class FakeRouter:
        def __init__(self, model, redis_url, **kw):
            seen["router"] = kw

    async def fake_serve_with_autoscaler(router, settings, serve):
        seen["settings"] = settings

    monkeypatch.setattr(router_main, "Router", FakeRouter)
    monkeypatch.setattr(router_main, "serve_with_autoscaler", fake_serve_with_autoscaler)
    objs = by_kind_name(objects(values))
    c = router_container(objs)
    assert router_main.main(_expand(c["args"], _container_env(objs, c))) == 0
    s, a = seen["settings"], values["autoscaler"]
    rendered = chart_render.load_values(chart_render.CHART / "values.yaml")["autoscaler"]
    a = {**rendered, **a}
    assert s.deployments == {Pool.PREFILL: "tandem-prefill", Pool.DECODE: "tandem-decode"}
    assert s.namespace == "tandem" and s.cluster == "tandem"
    assert s.interval_s == a["intervalSeconds"] and s.drain_timeout_s == a["drainTimeoutSeconds"]
    cfg = s.config
    assert (cfg.ttft_slo_s, cfg.tpot_slo_s) == (a["ttftSloSeconds"], a["tpotSloSeconds"])
    assert cfg.prefill == Bounds(a["prefill"]["minReplicas"], a["prefill"]["maxReplicas"])
    assert cfg.decode == Bounds(a["decode"]["minReplicas"], a["decode"]["maxReplicas"])
    for field, key in (("queue", "prefillQueue"), ("kv", "kvUtilization"), ("tpot", "decodeStepTime")):
        b = a[key]
        assert getattr(cfg, field) == Band(b["scaleDownBelow"], b["target"], b["scaleUpAbove"])
    assert (cfg.scale_up_cooldown_s, cfg.scale_down_cooldown_s, cfg.scale_down_stabilization_s) == (
        a["scaleUpCooldownSeconds"], a["scaleDownCooldownSeconds"], a["scaleDownStabilizationSeconds"])


def test_the_role_allows_exactly_the_deployments_the_router_scales():
    objs = by_kind_name(objects(copy.deepcopy(ON)))
    args = router_container(objs)["args"]
    named = {a.split("=", 1)[1] for a in args if a.startswith("--autoscale-") and "-deployment=" in a}
    (scale_rule,) = [r for r in objs[("Role", "tandem-autoscaler")]["rules"]
                     if r["resources"] == ["deployments/scale"]]
    assert named <= set(scale_rule["resourceNames"]) and {"get", "patch"} <= set(scale_rule["verbs"])
    assert "--autoscale-namespace=tandem" in args
    pod = objs[("Deployment", "tandem-router")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tandem" and pod["automountServiceAccountToken"] is True


def test_replica_counts_are_left_to_the_autoscaler():
    values = copy.deepcopy(ON)
    values["colocated"] = {"replicas": 2}
    objs = by_kind_name(objects(values))
    for role in ("prefill", "decode"):
        assert "replicas" not in objs[("Deployment", f"tandem-{role}")]["spec"]
    assert objs[("Deployment", "tandem-colocated")]["spec"]["replicas"] == 2   # not autoscaled
    objs = by_kind_name(objects())
    assert objs[("Deployment", "tandem-decode")]["spec"]["replicas"] == 1


@pytest.mark.parametrize("values, message", [
    ({"autoscaler": {"enabled": True, "prefill": {"minReplicas": 0, "maxReplicas": 2}}},
     "/autoscaler/prefill/minReplicas"),
    ({"autoscaler": {"kvUtilization": {"scaleDownBelow": 0.4, "target": 0.7, "scaleUpAbove": 1.5}}},
     "/autoscaler/kvUtilization/scaleUpAbove"),
    ({"autoscaler": {"ttftSloSeconds": 0}}, "/autoscaler/ttftSloSeconds"),
    ({"autoscaler": {"scaleDownCooldownSeconds": -1}}, "/autoscaler/scaleDownCooldownSeconds"),
    ({"autoscaler": {"maxReplicas": 3}}, "maxReplicas"),
])
def test_schema_rejects_bad_autoscaler_values(values, message):
    with pytest.raises(helm.HelmValuesError) as e:
        chart_render.render(values)
    assert message in str(e.value)


def test_min_above_max_fails_the_render():
    with pytest.raises(helm.HelmError, match=r"autoscaler.decode.minReplicas \(5\) must be <= "
                                             r"autoscaler.decode.maxReplicas \(2\)"):
        chart_render.render({"autoscaler": {"enabled": True,
                                            "decode": {"minReplicas": 5, "maxReplicas": 2}}})


def test_band_order_is_checked_by_the_router(capsys):
    """The schema cannot order three numbers; the router refuses at start with the reason."""
    import router.__main__ as router_main

    values = {"autoscaler": {"enabled": True, "kvUtilization": {
        "scaleDownBelow": 0.8, "target": 0.7, "scaleUpAbove": 0.9}}}
    objs = by_kind_name(objects(values))
    c = router_container(objs)
    with pytest.raises(SystemExit) as e:
        router_main.main(_expand(c["args"], _container_env(objs, c)))
    assert e.value.code == 2 and "kv band: need 0 < down < target < up" in capsys.readouterr().err


def test_notes_say_autoscaled():
    notes = chart_render.render(copy.deepcopy(ON))["tandem/templates/NOTES.txt"]
    assert "1-4 worker(s), autoscaled" in notes and "leader router" in notes
