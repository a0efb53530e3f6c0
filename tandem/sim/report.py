"""Simulation reports in loadgen's format (loadgen/report.py), so `python -m loadgen compare` and
its plots read simulated and measured runs alike; the target is {"kind": "sim", …}."""
from __future__ import annotations

from loadgen import report as rep
from loadgen.metrics import RequestResult, summarize
from loadgen.workloads import Workload


def build(results: list[RequestResult], workload: Workload, *, config: dict, profile_path: str, stats: dict,
          seed: int, options: dict, ttft_slo: float | None = None, tpot_slo: float | None = None) -> dict:
    summary = summarize(results, ttft_slo, tpot_slo)
    report = rep.build_report(target={"kind": "sim", "profile": profile_path, "config": config},
                              workload=workload.describe(), seed=seed, summary=summary, options=options)
    report["sim"] = stats
    return report
