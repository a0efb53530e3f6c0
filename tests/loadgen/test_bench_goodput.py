"""`python -m loadgen.bench_goodput`: the whole flow on fake systems, and once on a real tiny cluster."""
from __future__ import annotations

import contextlib
import csv
import json

import pytest

from loadgen import bench_goodput, bench_systems, targets
from loadgen.bench_systems import Handle, Unavailable

from .fakes import FakeTarget
from .test_workloads import AZURE_CONV, needs_traces

FAST = ["--probe-s", "0.3", "--min-requests", "5", "--max-requests", "40", "--budget-s", "2",
        "--unloaded-requests", "3", "--unloaded-output-tokens", "4", "--warmup", "1", "--cooldown-s", "0",
        "--max-output-tokens", "4", "--no-progress"]


@pytest.fixture
def fake_systems(monkeypatch):
    """vllm and adaptive cannot run; fixed and colocated are FakeTargets (sim:fixed, sim:colocated)."""
    for name, first_s in (("fixed", 0.004), ("colocated", 0.002)):
        targets.register_simulator(lambda config, first_s=first_s: FakeTarget(first_s=first_s, gap_s=0.001, slots=1,
                                                                              vocab=1000), name)
    started = []

    @contextlib.contextmanager
    def start(name, opts):
        if name in ("vllm", "adaptive"):
            raise Unavailable(f"{name} is not here")
        started.append((name, opts.dtype))
        yield Handle(f"sim:{name}:x")

    monkeypatch.setattr(bench_goodput, "start_system", start)
    yield started
    for name in ("fixed", "colocated"):
        targets.unregister_simulator(name)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow          # real-time probes (~5 s)
def test_flow_on_fake_systems(tmp_path, capsys, fake_systems):
    rc = bench_goodput.main(["--trace", "synthetic:n=40,input=64,output=4", *FAST, "--out-dir", str(tmp_path),
                              "--systems", "vllm,fixed,adaptive,colocated"])
    out = capsys.readouterr().out
    assert rc == 0
    line = _last_json(out)
    assert list(line) == ["tight", "relaxed"]
    for lv in line:
        assert list(line[lv]) == ["ttft_slo_s", "tpot_slo_s", "vllm", "fixed", "adaptive", "colocated", "single"]
        assert line[lv]["vllm"] is None and line[lv]["adaptive"] is None and line[lv]["single"] is None
        assert isinstance(line[lv]["fixed"], float) and isinstance(line[lv]["colocated"], float)
    assert line["relaxed"]["ttft_slo_s"] > line["tight"]["ttft_slo_s"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # without vLLM the SLOs come from the fastest Tandem system, and the report says so
    assert summary["reference"]["system"] in ("fixed", "colocated")
    assert "vLLM could not run (vllm is not here)" in summary["reference"]["note"]
    assert summary["systems"]["adaptive"] == bench_goodput.bench_report.system_record("unavailable", "adaptive is not here")
    assert summary["goodput"] == line and set(summary["ratios"]["tight"]) >= {"fixed/colocated", "fixed/vllm"}
    assert "NOTE: vLLM could not run" in out and "SLO tight   (3x)" in out
    # every system ran the same dtype; the reference pass measured both, the last one was searched while up
    assert [name for name, _ in fake_systems] == ["fixed", "colocated", "fixed"]
    assert len({dtype for _, dtype in fake_systems}) == 1
    for name in ("fixed", "colocated"):
        rec = summary["systems"][name]
        assert rec["status"] == "ok" and rec["probes"]
        with open(tmp_path / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == sum(p["requests"] for p in rec["probes"])
        assert {"probe", "rate", "ttft_s", "queue_s", "prefill_s", "transfer_s"} <= set(rows[0])
    assert (tmp_path / "latency_vs_rate_tight.png").exists() and (tmp_path / "latency_vs_rate_relaxed.png").exists()


def test_nothing_can_run(tmp_path, capsys, monkeypatch):
    @contextlib.contextmanager
    def start(name, opts):
        raise Unavailable("no")
        yield

    monkeypatch.setattr(bench_goodput, "start_system", start)
    rc = bench_goodput.main(["--trace", "synthetic:n=10,input=8,output=4", *FAST, "--out-dir", str(tmp_path)])
    assert rc == 1
    line = _last_json(capsys.readouterr().out)
    assert all(v is None for lv in line.values() for v in lv.values())


def test_refuses_an_unknown_system(tmp_path, capsys):
    assert bench_goodput.main(["--systems", "colocated,sglang", "--out-dir", str(tmp_path)]) == 2
    assert "--systems: unknown ['sglang']" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["0.1", "0.1,x", "0.1,0", "-1,0.01", "0.1,0.01,3"])
def test_refuses_a_malformed_reference_latency(tmp_path, capsys, given):
    assert bench_goodput.main([f"--reference-latency={given}", "--out-dir", str(tmp_path)]) == 2
    assert "--reference-latency: expected TTFT,TPOT in seconds, both > 0" in capsys.readouterr().err


@pytest.mark.slow          # real-time probes (~3 s)
def test_given_reference_latency_sets_the_slos_without_measuring_a_reference(tmp_path, capsys, fake_systems):
    rc = bench_goodput.main(["--trace", "synthetic:n=40,input=64,output=4", *FAST, "--out-dir", str(tmp_path),
                             "--systems", "fixed", "--reference-latency", "0.2,0.01"])
    assert rc == 0
    line = _last_json(capsys.readouterr().out)
    assert (line["tight"]["ttft_slo_s"], line["tight"]["tpot_slo_s"]) == pytest.approx((0.6, 0.03))
    assert (line["relaxed"]["ttft_slo_s"], line["relaxed"]["tpot_slo_s"]) == pytest.approx((2.0, 0.1))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reference"]["system"] == "given" and "--reference-latency" in summary["reference"]["note"]
    assert [name for name, _ in fake_systems] == ["fixed"]        # started once, to be searched


def test_host_dtype_is_tandems_auto_and_adaptive_detection():
    from services.engine.dtype_policy import auto_dtype
    dtype, why = bench_systems.host_dtype()
    assert dtype == auto_dtype("cpu") and why.startswith("--dtype auto: ")
    why_not = bench_systems.adaptive_support()
    assert why_not is None or "pools" in why_not


@pytest.mark.slow
@needs_traces
def test_real_tiny_cluster(tmp_path, capsys):
    """One real 1P+1D cluster of the tiny model: the reference is itself, its CSV has the TTFT breakdown."""
    rc = bench_goodput.main(["--model", "tiny", "--trace", AZURE_CONV, "--systems", "fixed", "--max-input-tokens", "64",
                             *FAST, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    line = _last_json(out)
    assert line["tight"]["fixed"] is not None and line["tight"]["colocated"] is None
    with open(tmp_path / "fixed.csv") as f:
        rows = [r for r in csv.DictReader(f) if not r["error"]]
    assert rows and all(r["prefill_instance"] == "prefill-0" and r["decode_instance"] == "decode-0" for r in rows)
    assert all(float(r["prefill_s"]) > 0 for r in rows)
