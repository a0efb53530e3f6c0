"""loadgen's OpenAI target end to end against Tandem's own OpenAI-compatible API (a real 1P+1D
cluster of `tiny`): token-id prompts and the ignore_eos/min_tokens extras are accepted, so every
request runs to exactly its max_tokens, and the router's metrics count the same requests."""
from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadgen.metrics import summarize
from loadgen.runner import run
from loadgen.targets import OpenAITarget
from loadgen.workloads import WorkloadConfig, build_workload
from tandem.local_cluster import LocalCluster

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]     # a real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster("tiny", prefill=1, decode=1, http_port=0, metrics_port=0, worker_args=["--num-blocks", "300"],
                      log_dir=str(tmp_path_factory.mktemp("cluster-logs"))) as c:
        yield c


def _finished(metrics_address: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "tandem_requests_total" and s.labels == {"api": "openai", "outcome": "finished"})


def test_openai_target_in_process_counts_every_token(cluster):
    async def go():
        target = OpenAITarget(f"http://{cluster.http_address}", timeout_s=120)
        async with target:
            vocab = await target.vocab_size()
            wl = build_workload(WorkloadConfig(trace="synthetic:n=6,input=24,output=7", arrival="constant",
                                               rate=50.0, vocab_size=vocab))
            results, wall = await run(wl, target, out=io.StringIO())
            return vocab, target, results, wall

    before = _finished(cluster.metrics_address)
    vocab, target, results, wall = asyncio.run(go())
    assert vocab == 512 and target.model == "tiny"
    assert target.describe() == {"kind": "openai", "url": f"http://{cluster.http_address}", "model": "tiny",
                                 "ignore_eos_extras": True, "prompt": "token_ids"}
    s = summarize(results, wall=wall)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (6, 0, 42)
    assert all(r.ok and r.output_tokens == 7 for r in results)
    assert _finished(cluster.metrics_address) == before + 6


def test_loadgen_cli_against_tandem_http(cluster, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "loadgen", "run", "--target", f"http://{cluster.http_address}",
                           "--trace", "synthetic:n=10,input=32,output=5", "--rate", "20", "--seed", "4",
                           "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert (summary["completed"], summary["failed"], summary["output_tokens"]) == (10, 0, 50)
    assert 0 < summary["ttft"]["p50"] <= summary["ttft"]["p99"] and summary["throughput_tokens_s"] > 0
    assert report["target"]["kind"] == "openai" and report["target"]["ignore_eos_extras"] is True
    assert report["workload"]["config"]["vocab_size"] == 512              # asked of /v1/models
