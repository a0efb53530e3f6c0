"""Metrics and logs of a real 1P+1D cluster: /metrics on the router and both workers move as a small
load says they must, every metric the Grafana dashboard queries exists in a scrape, JSON log lines
carry one request id through the router and both workers, and `tandem up` passes the HTTP and
metrics ports through."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from k8s import dashboard
from tandem import Client
from tests.integration.http_helpers import exposed_names, http, scrape, value

pytestmark = pytest.mark.timeout(600)


def _scrapes(c) -> dict[str, dict]:
    return {"router": scrape(c.metrics_address), **{i: scrape(a) for i, a in c.worker_metrics.items()}}


def test_metrics_move_under_a_small_load(openai_cluster):
    c = openai_cluster
    assert set(c.worker_metrics) == {"prefill-0", "decode-0"}
    before = _scrapes(c)
    n, max_tokens, prompt_len = 6, 8, 20
    prompts = [[3 + (7 * i + j) % 500 for j in range(prompt_len)] for i in range(n)]

    def over_http(p):
        status, body = http(c.http_address, "/v1/completions",
                            {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        assert status == 200, body

    def over_grpc(p):
        with Client(c.address) as client:
            assert len(client.complete(token_ids=p, max_tokens=max_tokens, ignore_eos=True).token_ids) == max_tokens

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda ip: (over_http if ip[0] % 2 else over_grpc)(ip[1]), enumerate(prompts)))
    after = _scrapes(c)

    def delta(process, name, **labels):
        return value(after[process], name, **labels) - value(before[process], name, **labels)

    for api in ("grpc", "openai"):
        assert delta("router", "tandem_requests_total", api=api, outcome="finished") == n // 2
        assert delta("router", "tandem_request_ttft_seconds_count", api=api) == n // 2
        assert delta("router", "tandem_request_tpot_seconds_count", api=api) == n // 2
        assert delta("router", "tandem_request_e2e_seconds_count", api=api) == n // 2
        assert delta("router", "tandem_generation_tokens_total", api=api) == n // 2 * max_tokens
        assert delta("router", "tandem_prompt_tokens_total", api=api) == n // 2 * prompt_len
        assert value(after["router"], "tandem_requests_in_flight", api=api) == 0
    assert value(after["router"], "tandem_instances", role="prefill", state="serving") == 1
    assert value(after["router"], "tandem_instances", role="decode", state="serving") == 1
    assert value(after["router"], "tandem_cluster_kv_blocks_total", role="decode") == 400

    # prefill: computes the prompts (the prefix cache may serve some), sends their KV
    assert 0 < delta("prefill-0", "tandem_engine_tokens_total", kind="prefill") <= n * prompt_len
    assert delta("prefill-0", "tandem_engine_step_seconds_count") > 0
    assert delta("prefill-0", "tandem_kv_transfers_total", direction="sent") == n
    assert delta("prefill-0", "tandem_kv_transfer_window_seconds_count") == n
    assert delta("prefill-0", "tandem_kv_transfer_bytes_total", direction="sent") > 0
    assert delta("prefill-0", "tandem_kv_transfer_failures_total") == 0
    # decode: receives the same bytes, decodes every token after the first
    assert delta("decode-0", "tandem_kv_transfers_total", direction="received") == n
    assert delta("decode-0", "tandem_kv_transfer_bytes_total", direction="received") == \
        delta("prefill-0", "tandem_kv_transfer_bytes_total", direction="sent")
    assert delta("decode-0", "tandem_engine_tokens_total", kind="decode") == n * (max_tokens - 1)
    # the router reads every decode worker's tokens from one Outputs stream: each request's own stream
    # carried only its last chunk, the rest came a step at a time through the router's stream
    assert value(after["decode-0"], "tandem_worker_outputs_streams") == 1
    assert delta("decode-0", "tandem_worker_output_chunks_total", path="own") == n
    assert delta("decode-0", "tandem_worker_output_chunks_total", path="outputs") >= n
    for worker in ("prefill-0", "decode-0"):
        assert value(after[worker], "tandem_kv_blocks_total") == 400
        assert value(after[worker], "tandem_leases") == 0
        assert value(after[worker], "tandem_worker_state", state="serving") == 1
        assert value(after[worker], "tandem_worker_info", instance=worker) == 1


def test_every_dashboard_metric_exists_in_a_scrape(openai_cluster):
    board = json.loads(dashboard.OUT.read_text())
    used = set(re.findall(r"tandem_[a-z0-9_]+", json.dumps(board)))
    exposed = exposed_names(openai_cluster.metrics_address)
    for address in openai_cluster.worker_metrics.values():
        exposed |= exposed_names(address)
    assert used and used <= exposed, f"dashboard queries metrics nobody exports: {sorted(used - exposed)}"
    assert all(name.startswith("tandem_") for name in exposed)


def test_workers_serve_health_beside_metrics(openai_cluster):
    for address in openai_cluster.worker_metrics.values():
        assert http(address, "/health") == (200, {"status": "ok"})
    status, body = http(openai_cluster.metrics_address, "/health")
    assert status == 200


def _json_lines(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def test_json_logs_carry_the_request_id_from_router_to_workers(openai_cluster):
    c = openai_cluster
    rid = "trace-me-7"
    status, _ = http(c.http_address, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 4, "request_id": rid})
    assert status == 200
    with Client(c.address) as client:                      # the gRPC path binds it too
        client.complete(token_ids=[8, 9], max_tokens=3, request_id="trace-me-8")

    def lines(name, request_id):
        return [x for x in _json_lines(os.path.join(c.log_dir, f"{name}.log")) if x.get("request_id") == request_id]

    import time
    deadline = time.monotonic() + 30
    while not (lines("router", "trace-me-8") and lines("decode-0", "trace-me-8")):
        assert time.monotonic() < deadline, "log lines did not appear"
        time.sleep(0.1)
    router_lines = lines("router", rid)
    done = [x for x in router_lines if x.get("outcome") == "finished"]
    assert done and done[0]["api"] == "openai" and done[0]["output_tokens"] == 4 and done[0]["component"] == "router"
    assert {x["rpc"] for x in lines("prefill-0", rid) if "rpc" in x} == {"Prefill"}
    assert {x["rpc"] for x in lines("decode-0", rid) if "rpc" in x} == {"Decode"}     # it reserves too
    assert all(x["instance"] == "decode-0" for x in lines("decode-0", rid))
    assert [x["api"] for x in lines("router", "trace-me-8") if "api" in x] == ["grpc"]


def test_tandem_up_serves_openai_and_metrics(export_named, tmp_path):
    cmd = [sys.executable, "-m", "tandem.cli", "up", "--model", export_named("tiny"), "--port", "0", "--http-port", "0",
           "--metrics-port", "0", "--num-blocks", "100", "--log-dir", str(tmp_path), "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), f"{line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        words = dict(w.split("=", 1) for w in line.split()[2:])
        status, body = http(words["http"], "/v1/completions", {"prompt": [5, 6], "max_tokens": 3, "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert value(scrape(words["metrics"]), "tandem_requests_total", api="openai", outcome="finished") == 1
        worker_logs = [p for p in os.listdir(tmp_path) if p != "router.log"]
        assert any("metrics=" in open(tmp_path / p).read() for p in worker_logs)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_ports_are_refused_before_anything_starts():
    r = subprocess.run([sys.executable, "-m", "tandem.cli", "up", "--http-port", "70000", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--http-port 70000" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "router", "--redis", "redis://127.0.0.1:1", "--metrics-port", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--metrics-port -1" in r.stderr and "Traceback" not in r.stderr
