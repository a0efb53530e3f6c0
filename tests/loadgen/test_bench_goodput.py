"""`python -m loadgen.bench_goodput` on the tiny model: both clusters searched, reports and comparison written."""
from __future__ import annotations

import json

from loadgen import bench_goodput

from .test_workloads import AZURE_CONV, needs_traces


@needs_traces
def test_bench_goodput_tiny(tmp_path):
    out = tmp_path / "bench"
    rc = bench_goodput.main(["--model", "tiny", "--trace", AZURE_CONV, "--max-requests", "8",
                             "--max-input-tokens", "128", "--max-output-tokens", "8", "--rate", "5",
                             "--search-steps", "1", "--ttft-slo", "5", "--tpot-slo", "1", "--skip-vllm",
                             "--out-dir", str(out)])
    assert rc == 0
    for name in ("disaggregated", "colocated"):
        report = json.loads((out / f"{name}.json").read_text())
        assert report["summary"]["completed"] == 8
        assert report["search"]["best_rate_rps"] >= 5
    compare = (out / "compare.txt").read_text()
    assert compare.startswith("SLOs: TTFT <= 5.0 s, TPOT <= 1.0 s") and "goodput_requests_s" in compare
    assert (out / "compare_goodput.png").exists()


def test_bench_goodput_refuses_an_unknown_system(tmp_path, capsys):
    assert bench_goodput.main(["--systems", "colocated,sglang", "--out-dir", str(tmp_path)]) == 2
    assert "--systems: unknown ['sglang']" in capsys.readouterr().err
