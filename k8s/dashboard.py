"""Build the Grafana dashboard shipped with the chart (k8s/tandem/dashboards/tandem.json).

    python k8s/dashboard.py            # rewrite the JSON
    python k8s/dashboard.py --check    # exit 1 if the checked-in JSON is out of date

Every query uses only metrics the router and workers export (router/metrics.py,
services/worker/metrics.py); tests/integration/test_openai_api.py checks each one against a
real scrape. Worker series carry `instance` = the Tandem instance id (the chart's
ServiceMonitor keeps it with honorLabels); the `$instance` variable filters the worker panels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tandem" / "dashboards" / "tandem.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
W = '{instance=~"$instance"}'          # worker panels' filter
RATE = "$__rate_interval"


def _q(h: float, metric: str, by: str = "", where: str = "") -> str:
    """histogram_quantile over `metric`_bucket, summed by le (and `by`)."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({h}, sum by ({group}) (rate({metric}_bucket{where}[{RATE}])))"


class Layout:
    """Places panels two per row (w=12, h=8) under row headers, with unique ids."""

    def __init__(self):
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def timeseries(self, title: str, targets: list[tuple[str, str]], unit: str, description: str = "",
                   stack: bool = False) -> None:
        panel = {
            "type": "timeseries", "title": title, "id": self._id(), "datasource": DS, "description": description,
            "gridPos": {"h": 8, "w": 12, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10, "showPoints": "never",
                                                                  "stacking": {"mode": "normal" if stack else "none"}}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                        for i, (expr, legend) in enumerate(targets)],
        }
        self.panels.append(panel)
        self.x += 12
        if self.x == 24:
            self.x, self.y = 0, self.y + 8

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def build() -> dict:
    g = Layout()
    g.row("Requests (router)")
    g.timeseries("Requests by outcome", [("sum by (outcome) (rate(tandem_requests_total[$__rate_interval]))",
                                          "{{outcome}}")], "reqps",
                 "finished, aborted, cancelled, or the gRPC status of the error", stack=True)
    g.timeseries("In flight and queued", [("sum by (api) (tandem_requests_in_flight)", "{{api}}"),
                                          ("sum(tandem_router_queued_requests)", "waiting for KV room")], "short",
                 "queued: requests the router holds back while every instance is full")
    g.timeseries("Tokens per second", [
        ("sum(rate(tandem_prompt_tokens_total[$__rate_interval]))", "prompt"),
        ("sum(rate(tandem_generation_tokens_total[$__rate_interval]))", "generated")], "short")
    g.timeseries("Instances by role and state", [
        ("sum by (role, state) (tandem_instances) > 0", "{{role}} {{state}}")], "short", stack=True)
    g.row("Latency (router)")
    for title, metric in (("Time to first token", "tandem_request_ttft_seconds"),
                          ("Time per output token", "tandem_request_tpot_seconds"),
                          ("End to end", "tandem_request_e2e_seconds")):
        g.timeseries(title, [(_q(q, metric), f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)], "s")
    g.row("Instances (workers)")
    g.timeseries("KV cache used", [(f"tandem_kv_blocks_used{W} / tandem_kv_blocks_total{W}", "{{instance}}")],
                 "percentunit", "Blocks held by requests and reservations over the pool (prefix cache counts free)")
    g.timeseries("KV blocks free", [(f"tandem_kv_blocks_free{W}", "{{instance}}"),
                                    (f"tandem_kv_blocks_reserved{W}", "{{instance}} reserved")], "short")
    g.timeseries("Running and waiting requests", [(f"tandem_engine_running_requests{W}", "{{instance}} running"),
                                                  (f"tandem_engine_waiting_requests{W}", "{{instance}} waiting")],
                 "short", "waiting = the engine's queue length")
    g.timeseries("Queued prefill tokens", [(f"tandem_queued_prefill_tokens{W}", "{{instance}}")], "short")
    g.timeseries("Engine step time", [(_q(q, "tandem_engine_step_seconds", "role", W), f"{{{{role}}}} p{int(q * 100)}")
                                      for q in (0.5, 0.99)], "s")
    g.timeseries("Engine tokens per second", [
        (f"sum by (instance, kind) (rate(tandem_engine_tokens_total{W}[$__rate_interval]))", "{{instance}} {{kind}}")],
        "short")
    g.row("KV transfer")
    g.timeseries("KV bytes per second", [
        (f"sum by (instance, direction) (rate(tandem_kv_transfer_bytes_total{W}[$__rate_interval]))",
         "{{instance}} {{direction}}")], "Bps")
    g.timeseries("Transfer window", [(_q(q, "tandem_kv_transfer_window_seconds", "", W), f"p{int(q * 100)}")
                                     for q in (0.5, 0.99)], "s",
                 "First byte on the wire until the receiver's ACK (only the transfer itself)")
    g.timeseries("Effective transfer bandwidth", [
        (f'sum(rate(tandem_kv_transfer_bytes_total{{direction="sent",instance=~"$instance"}}[$__rate_interval])) / '
         f"sum(rate(tandem_kv_transfer_window_seconds_sum{W}[$__rate_interval]))", "bytes / window")], "Bps")
    g.timeseries("Transfer failures and aborts", [
        (f"sum by (direction) (rate(tandem_kv_transfer_failures_total{W}[$__rate_interval]))", "failed {{direction}}"),
        (f"sum(rate(tandem_kv_transfer_aborts_total{W}[$__rate_interval]))", "aborted")], "ops")
    g.row("Migration and leases")
    g.timeseries("Migrations", [
        (f"sum(rate(tandem_migrations_started_total{W}[$__rate_interval]))", "started"),
        (f"sum(rate(tandem_migrations_committed_total{W}[$__rate_interval]))", "committed"),
        (f"sum by (reason) (rate(tandem_migrations_aborted_total{W}[$__rate_interval]))", "aborted: {{reason}}")],
        "ops")
    g.timeseries("Migration downtime", [(_q(q, "tandem_migration_downtime_seconds", "", W), f"p{int(q * 100)}")
                                        for q in (0.5, 0.99)], "s", "Time a migrating request did not decode")
    g.timeseries("Migration stages", [(_q(q, "tandem_migration_stages", "", W), f"p{int(q * 100)}")
                                      for q in (0.5, 0.99)], "short", "Copy rounds, stop-and-copy included")
    g.timeseries("Leases", [(f"sum(tandem_leases{W})", "live"),
                            (f"sum(rate(tandem_leases_expired_total{W}[$__rate_interval]))", "expired / s")], "short")
    return {
        "title": "Tandem", "uid": "tandem-serving", "tags": ["tandem", "llm"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
             "current": {}, "hide": 0},
            {"name": "instance", "type": "query", "datasource": DS, "label": "Instance", "refresh": 2,
             "query": {"query": "label_values(tandem_worker_info, instance)", "refId": "instances"},
             "definition": "label_values(tandem_worker_info, instance)", "includeAll": True, "multi": True,
             "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1},
        ]},
        "annotations": {"list": []},
        "panels": g.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report whether the JSON is current")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"out of date: {OUT} (run: python k8s/dashboard.py)", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
