"""loadgen/bench_report.py: the summary's assembly, its last line and its ratios, on made-up results."""
from __future__ import annotations

import json

from loadgen import bench_report
from loadgen.goodput import Goodput, Slo

SLOS = {"tight": Slo(0.15, 0.024), "relaxed": Slo(0.5, 0.08)}


def _ok(tight, relaxed):
    return bench_report.system_record("ok", unloaded=(0.05, 0.008), goodputs={
        "tight": Goodput(tight, tight or None, 2 * tight or 0.1, True),
        "relaxed": Goodput(relaxed, relaxed, 2 * relaxed, False)})


SYSTEMS = {"vllm": _ok(4.0, 8.0), "fixed": _ok(0.0, 0.5), "colocated": _ok(1.0, 2.0), "single": _ok(2.0, 6.0),
           "adaptive": bench_report.system_record("unavailable", "no pools= yet")}


def test_final_line_has_the_slos_then_every_system_in_order():
    line = bench_report.final_line(SLOS, SYSTEMS)
    assert list(line) == ["tight", "relaxed"]
    assert list(line["tight"]) == ["ttft_slo_s", "tpot_slo_s", "vllm", "fixed", "adaptive", "colocated", "single"]
    assert line["tight"] == {"ttft_slo_s": 0.15, "tpot_slo_s": 0.024, "vllm": 4.0, "fixed": 0.0, "adaptive": None,
                             "colocated": 1.0, "single": 2.0}
    assert line["relaxed"]["fixed"] == 0.5
    json.dumps(line)                                     # one JSON object as it is


def test_a_system_not_run_or_failed_is_null():
    systems = {"fixed": bench_report.system_record("failed", "cluster died", probes=[{"rate": 1.0}])}
    line = bench_report.final_line(SLOS, systems)
    assert all(line[lv][name] is None for lv in ("tight", "relaxed") for name in ("vllm", "fixed", "adaptive", "colocated", "single"))


def test_ratios_cover_every_pair_and_are_null_without_both_goodputs():
    r = bench_report.ratios(SYSTEMS)
    assert set(r["tight"]) == {"adaptive/fixed", "adaptive/colocated", "adaptive/single", "adaptive/vllm",
                               "fixed/colocated", "fixed/single", "fixed/vllm", "colocated/single",
                               "colocated/vllm", "single/vllm"}
    assert r["relaxed"]["single/vllm"] == 0.75 and r["tight"]["colocated/single"] == 0.5
    assert r["relaxed"]["fixed/colocated"] == 0.25 and r["relaxed"]["colocated/vllm"] == 0.25
    assert r["tight"]["fixed/vllm"] == 0.0
    assert r["tight"]["adaptive/fixed"] is None                       # adaptive did not run
    assert bench_report.ratios({"fixed": _ok(1.0, 1.0), "colocated": _ok(0.0, 1.0)})["tight"]["fixed/colocated"] is None


def test_summary_and_table_state_the_reference_and_slos():
    doc = bench_report.summary(
        host={"cpu": "Test CPU"}, dtype={"dtype": "bfloat16", "source": "CPU flag avx512_bf16"},
        workload={"description": "trace.csv: first 100 requests"},
        reference={"system": "fixed", "ttft_s": 0.05, "tpot_s": 0.008, "scales": {"tight": 3.0, "relaxed": 10.0},
                   "how": "median of 5", "note": "vLLM not installed; SLOs from the fastest Tandem system"},
        slos=SLOS, attainment=0.9, systems=SYSTEMS, wall_s=12.0)
    assert doc["goodput"] == bench_report.final_line(SLOS, SYSTEMS)
    assert doc["slos"]["relaxed"] == {"scale": 10.0, "ttft_s": 0.5, "tpot_s": 0.08}
    assert list(doc["systems"]) == ["vllm", "fixed", "adaptive", "colocated", "single"]
    text = bench_report.table(doc)
    assert "NOTE: vLLM not installed; SLOs from the fastest Tandem system" in text
    assert "SLO tight   (3x): TTFT <= 0.15 s, TPOT <= 0.024 s" in text
    assert "adaptive   null: no pools= yet" in text
    assert "(budget)" in text                             # relaxed searches were not complete
