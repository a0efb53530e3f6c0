"""`python -m loadgen run` end to end against a real 1P+1D LocalCluster of the `tiny` model, then compare."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tandem.local_cluster import LocalCluster

from .test_workloads import AZURE_CONV, needs_traces

pytestmark = pytest.mark.slow          # every test here runs against a real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster("tiny", prefill=1, decode=1, worker_args=["--num-blocks", "300"],
                      log_dir=str(tmp_path_factory.mktemp("cluster-logs"))) as c:
        yield c


def _loadgen(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "loadgen", *args], capture_output=True, text=True, timeout=timeout)


@needs_traces
def test_run_against_tiny_cluster_writes_report_csv_and_plot(cluster, tmp_path):
    out, per_request, plot = tmp_path / "report.json", tmp_path / "requests.csv", tmp_path / "cdf.png"
    proc = _loadgen("run", "--target", f"grpc://{cluster.address}", "--trace", AZURE_CONV, "--max-requests", "20",
                    "--rate", "10", "--max-input-tokens", "128", "--max-output-tokens", "16", "--seed", "3",
                    "--ttft-slo", "2", "--tpot-slo", "0.5", "--out", str(out), "--csv", str(per_request),
                    "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["completed"] == 20 and summary["failed"] == 0
    for key in ("ttft", "tpot", "e2e"):
        assert set(summary[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < summary[key]["p50"] <= summary[key]["p99"]
    assert summary["throughput_tokens_s"] > 0
    assert 0.0 <= summary["attainment"] <= 1.0 and summary["goodput_requests_s"] >= 0
    assert report["seed"] == 3 and report["target"] == {"kind": "grpc", "url": f"grpc://{cluster.address}"}
    assert report["workload"]["format"] == "azure" and report["workload"]["requests"] == 20
    assert report["workload"]["config"]["vocab_size"] == 512          # asked of the cluster
    assert report["versions"]["python"]
    rows = list(csv.DictReader(per_request.open()))
    assert len(rows) == 20 and all(r["error"] == "" for r in rows)
    assert sum(int(r["output_tokens"]) for r in rows) == summary["output_tokens"]
    assert all(int(r["output_tokens"]) == int(r["max_tokens"]) for r in rows)   # ignore_eos
    assert plot.stat().st_size > 0

    second = tmp_path / "second.json"
    assert _loadgen("run", "--target", f"grpc://{cluster.address}", "--trace", AZURE_CONV, "--max-requests", "5",
                    "--rate", "10", "--max-input-tokens", "64", "--max-output-tokens", "8", "--no-progress",
                    "--out", str(second)).returncode == 0
    cmp = _loadgen("compare", str(out), str(second), "--plot-dir", str(tmp_path / "plots"))
    assert cmp.returncode == 0, cmp.stderr
    assert "ttft p50" in cmp.stdout and "x)" in cmp.stdout
    assert (tmp_path / "plots" / "compare_ttft.png").exists()


def test_unreachable_cluster_counts_failures(tmp_path):
    out = tmp_path / "report.json"
    proc = _loadgen("run", "--target", "grpc://127.0.0.1:1", "--trace", "synthetic:n=3,input=4,output=2",
                    "--rate", "50", "--vocab-size", "100", "--request-timeout", "5", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())["summary"]
    assert (summary["completed"], summary["failed"]) == (0, 3)
    assert "UNAVAILABLE" in next(iter(summary["errors"]))
