"""The Grafana dashboard shipped with the chart: generated JSON is current, well formed, rendered
into a valid ConfigMap only when asked, and scraped by a ServiceMonitor that keeps the worker's
`instance` label. (That every metric it queries exists in a real scrape is checked against a
running cluster in tests/integration/test_openai_api.py.)"""
from __future__ import annotations

import json
import re

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go SDK for Python) is not installed")
import kubernetes_validate  # noqa: E402

from k8s import dashboard  # noqa: E402
from k8s import render as chart_render  # noqa: E402

DASHBOARD_VALUES = {"router": {"metrics": {"enabled": True}}, "workers": {"metrics": {"enabled": True}},
                    "metrics": {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Tandem"}}}}


def dashboard_metrics(board: dict) -> set[str]:
    """Every tandem_* name in the dashboard's panel and variable queries."""
    text = json.dumps([p.get("targets", []) for p in board["panels"]] + board["templating"]["list"])
    return set(re.findall(r"tandem_[a-z0-9_]+", text))


def test_dashboard_json_is_current():
    assert dashboard.main(["--check"]) == 0, "run: python k8s/dashboard.py"


def test_dashboard_is_well_formed():
    board = json.loads(dashboard.OUT.read_text())
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].count("(") == t["expr"].count(")")
    names = dashboard_metrics(board)
    # what the issue asks a dashboard to show
    for wanted in ("tandem_requests_total", "tandem_request_ttft_seconds_bucket", "tandem_request_tpot_seconds_bucket",
                   "tandem_request_e2e_seconds_bucket", "tandem_engine_waiting_requests", "tandem_kv_blocks_used",
                   "tandem_kv_blocks_free", "tandem_queued_prefill_tokens", "tandem_engine_step_seconds_bucket",
                   "tandem_kv_transfer_bytes_total", "tandem_kv_transfer_window_seconds_bucket",
                   "tandem_kv_transfer_failures_total", "tandem_migrations_started_total",
                   "tandem_migrations_committed_total", "tandem_migrations_aborted_total",
                   "tandem_migration_downtime_seconds_bucket", "tandem_leases_expired_total", "tandem_instances"):
        assert wanted in names, wanted


def _objects(values):
    return [d for d in yaml.safe_load_all(chart_render.to_manifest(chart_render.render(values))) if d]


def test_configmap_only_when_enabled_and_holds_the_dashboard():
    assert not [o for o in _objects({}) if o["metadata"]["name"].endswith("grafana-dashboard")]
    cm = next(o for o in _objects(DASHBOARD_VALUES) if o["metadata"]["name"] == "tandem-grafana-dashboard")
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Tandem"}
    assert json.loads(cm["data"]["tandem.json"]) == json.loads(dashboard.OUT.read_text())
    for version in ("1.30.0", "1.34.0"):
        kubernetes_validate.validate(cm, version, strict=True)


def test_dashboard_needs_a_metrics_port():
    with pytest.raises(helm.HelmError, match="no data"):
        chart_render.render({"metrics": {"grafanaDashboard": {"enabled": True}}})


def test_schema_rejects_unknown_dashboard_keys():
    with pytest.raises(helm.HelmValuesError, match="grafanaDashboard"):
        chart_render.render({"metrics": {"grafanaDashboard": {"enabled": True, "folder": "x"}}})


def test_lint_clean_with_dashboard():
    report = helm.lint(chart_render.CHART, DASHBOARD_VALUES, strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_servicemonitor_keeps_the_instance_label():
    values = dict(DASHBOARD_VALUES, metrics={"serviceMonitor": {"enabled": True}})
    sm = next(o for o in _objects(values) if o["kind"] == "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True


def test_http_and_metrics_flags_parse_with_the_real_clis(monkeypatch):
    """With router.http, router.metrics and workers.metrics on, the pods' flags are ones the router
    and worker processes accept, with the chart's ports."""
    import router.__main__ as router_main
    from services.worker.__main__ import parse_args
    from tests.k8s.test_chart import _container_env, _expand, by_kind_name

    objs = by_kind_name(_objects({"router": {"http": {"enabled": True}, "metrics": {"enabled": True}},
                                  "workers": {"metrics": {"enabled": True}}}))
    seen = {}

    def fake_router(model, redis_url, **kw):
        seen.update(kw)
        return object()

    async def fake_serve(_router):
        return None

    monkeypatch.setattr(router_main, "Router", fake_router)
    monkeypatch.setattr(router_main, "serve", fake_serve)
    c = objs[("Deployment", "tandem-router")]["spec"]["template"]["spec"]["containers"][0]
    assert router_main.main(_expand(c["args"], _container_env(objs, c))) == 0
    assert (seen["http_port"], seen["metrics_port"]) == (8000, 9090)
    for role in ("prefill", "decode"):
        w = objs[("Deployment", f"tandem-{role}")]["spec"]["template"]["spec"]["containers"][0]
        assert parse_args(_expand(w["args"], _container_env(objs, w))).metrics_port == 9091
