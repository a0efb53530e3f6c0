"""The planner: on a synthetic profile it finds the known optimum; its Helm values render."""
from __future__ import annotations

import pytest

from loadgen.workloads import WorkloadConfig, build_workload
from tandem.sim import planner
from tandem.sim.costmodel import CostModel, Profile

# Prefill is expensive (0.1 s + 1 ms/token: 0.3 s for the 200-token prompts) and decode cheap (10 ms a
# step, 20 tokens): with a TPOT SLO of 20 ms one prefill inside a request's decodes breaks it
# ((0.3 + 18 x 0.01) / 19 = 25 ms), so colocated instances fail TPOT as soon as arrivals overlap, and
# prefill capacity decides the rest: of 3 instances, 2 prefill + 1 decode is the optimum.
PROFILE = Profile(cost=CostModel(prefill=(0.1, 1e-3, 0.0), decode=(0.01, 0.0, 1e-5)), model="m",
                  dtype="float32", num_blocks=4000)


def requests():
    return build_workload(WorkloadConfig(trace="synthetic:n=80,input=200,output=20", rate=2.0, seed=0)).requests


def test_plan_finds_the_known_optimum():
    cands = [c for c in planner.candidates(3, seqs=(256,), budgets=(2048,)) if c.pools == "fixed"]
    rows = planner.plan(PROFILE, requests(), instances=3, ttft=2.0, tpot=0.02, cands=cands)
    assert rows[0]["config"]["prefill"] == 2 and rows[0]["config"]["decode"] == 1
    by = {r["label"].split(" seqs")[0]: r for r in rows}
    assert by["2P+1D fixed"]["goodput_rps"] > 1.5 * by["1P+2D fixed"]["goodput_rps"]
    assert by["colocated x3"]["goodput_rps"] < by["2P+1D fixed"]["goodput_rps"]
    assert "prefill busy" in rows[0]["why"]
    assert "2P+1D" in planner.table(rows)


def test_bad_plans_say_what_to_change():
    with pytest.raises(planner.PlanError, match="--instances 1: plan at least 2"):
        planner.candidates(1)
    with pytest.raises(planner.PlanError, match="--trace: no usable rows"):
        planner.plan(PROFILE, [], instances=2, ttft=1.0, tpot=0.1)
    with pytest.raises(planner.PlanError, match="--attainment"):
        planner.plan(PROFILE, requests(), instances=2, ttft=1.0, tpot=0.1, attainment=1.5)


def test_helm_values_render_with_the_chart():
    chart_render = pytest.importorskip("k8s.render")
    pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    import yaml
    row = {"config": {"prefill": 2, "decode": 1, "colocated": 0, "pools": "adaptive", "max_num_seqs": 64,
                      "max_num_batched_tokens": 512, "queue_policy": "fcfs"}}
    values = planner.helm_values(row, Profile(cost=PROFILE.cost, model="small", dtype="bfloat16"), 2.0, 0.1)
    docs = [d for d in yaml.safe_load_all(chart_render.to_manifest(chart_render.render(values))) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    replicas = {name.rsplit("-", 1)[-1]: d["spec"].get("replicas") for name, d in deployments.items()}
    assert replicas.get("prefill") == 2 and replicas.get("decode") == 1
