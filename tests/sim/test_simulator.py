"""The simulator: hand-computed timelines on tiny traces (virtual clock, no sleeps), determinism for a
seed, the router's own policy objects called (not copies), loadgen's report format."""
from __future__ import annotations

import pytest

from loadgen import report as rep
from loadgen.workloads import RequestSpec, WorkloadConfig, build_workload
from router.migration import policy as migration_policy
from router.request import placement
from router.cluster import role_policy
from services.engine.policy import POLICIES, SchedulingPolicy
from tandem.sim import report as sim_report
from tandem.sim.costmodel import CostModel, Profile
from tandem.sim.router import RouterConfig
from tandem.sim.simulator import SimConfig, SimConfigError, simulate

# prefill 0.1 s + 0.01 s/token, decode 0.05 s a step, KV transfer 0.01 s: every time below by hand
COST = CostModel(prefill=(0.1, 0.01, 0.0), decode=(0.05, 0.0, 0.0), transfer_latency_s=0.01,
                 transfer_bytes_per_s=1e18, migration_stage_s=0.0, kv_bytes_per_block=0)
PROFILE = Profile(cost=COST, model="m", dtype="float32", block_size=16, num_blocks=1000)
NO_MIGRATION = RouterConfig(migration=False)


def spec(i, t, prompt, out):
    return RequestSpec(index=i, row=i, arrival_s=t, input_tokens=prompt, output_tokens=out)


def test_colocated_timeline_by_hand():
    # A: prefill of 10 tokens 0→0.2 (first token), decodes end at 0.25 and 0.30 ... but B arrives at
    # 0.22, inside A's second decode segment: the segment is cut after the step in flight (0.25), then
    # one mixed step (A's decode + B's 20-token prefill) takes max(0.1, 0.05) + 0.2 = 0.3 s → 0.55:
    # A's third token and B's first; B's one decode 0.55 → 0.60.
    reqs = [spec(0, 0.0, 10, 3), spec(1, 0.22, 20, 2)]
    results, _ = simulate(PROFILE, reqs, SimConfig(prefill=0, decode=0, colocated=1, router=NO_MIGRATION))
    a, b = results
    assert a.events[0][0] == pytest.approx(0.2) and a.end_s == pytest.approx(0.55)
    assert [round(t, 9) for t, _ in a.events] == [0.2, 0.25, 0.55]
    assert a.ttft_s == pytest.approx(0.2) and a.tpot_s == pytest.approx(0.175)
    assert b.ttft_s == pytest.approx(0.33) and b.tpot_s == pytest.approx(0.05) and b.end_s == pytest.approx(0.60)


def test_disaggregated_timeline_by_hand():
    # P prefills 0→0.2 and hands off; the KV tail takes 0.01 s: the first token at 0.21, D adopts then
    # and decodes 0.21→0.26→0.31. A second request arriving at 0.05 waits for P: 0.2→0.5 (+0.01).
    reqs = [spec(0, 0.0, 10, 3), spec(1, 0.05, 20, 2)]
    results, stats = simulate(PROFILE, reqs, SimConfig(prefill=1, decode=1, router=NO_MIGRATION))
    a, b = results
    # a decode-only stretch is one message of its tokens at its end (0.26 and 0.31: one of 2 at 0.31)
    assert [(round(t, 9), n) for t, n in a.events] == [(0.21, 1), (0.31, 2)]
    assert a.ttft_s == pytest.approx(0.21) and a.tpot_s == pytest.approx(0.05)
    # D: A decodes alone 0.21→0.26→0.31 (finished), B joins at 0.51 → 0.56
    assert [(round(t, 9), n) for t, n in b.events] == [(0.51, 1), (0.56, 1)]
    assert b.ttft_s == pytest.approx(0.46)
    assert stats["instances"]["prefill-0"]["busy_s"] == pytest.approx(0.5)


def test_kv_blocks_bound_the_batch_and_preempt():
    # 2 blocks of 16 tokens: two 15-token prompts fit; decoding both needs a third block at token
    # 17 → one is preempted (the policy's victim), recomputes prompt + output once the other is done.
    prof = Profile(cost=COST, model="m", dtype="float32", block_size=16, num_blocks=2)
    reqs = [spec(0, 0.0, 15, 4), spec(1, 0.0, 15, 4)]
    results, stats = simulate(prof, reqs, SimConfig(prefill=0, decode=0, colocated=1, router=NO_MIGRATION))
    assert all(r.ok and r.output_tokens == 4 for r in results)
    assert stats["instances"]["colocated-0"]["preemptions"] >= 1
    first, second = sorted(r.end_s for r in results)
    assert second > first


def _workload(n=120, rate=2.0, seed=0):
    return build_workload(WorkloadConfig(trace=f"synthetic:n={n},input=uniform:16:600,output=uniform:4:96",
                                         rate=rate, seed=seed))


@pytest.mark.parametrize("cfg", [SimConfig(prefill=1, decode=2), SimConfig(prefill=0, decode=0, colocated=3),
                                 SimConfig(prefill=1, decode=2, router=RouterConfig(pools="adaptive"))],
                         ids=["fixed", "colocated", "adaptive"])
def test_deterministic_for_a_seed(cfg):
    prof = Profile(cost=CostModel(prefill=(0.01, 2e-4, 1e-8), decode=(0.01, 1e-6, 2e-4), kv_bytes_per_block=4096),
                   model="m", dtype="float32", num_blocks=300, num_layers=8)
    wl = _workload()
    first, _ = simulate(prof, wl.requests, cfg)
    second, _ = simulate(prof, _workload().requests, cfg)
    assert [(r.events, r.end_s, r.error) for r in first] == [(r.events, r.end_s, r.error) for r in second]
    assert all(r.ok for r in first)
    other, _ = simulate(prof, _workload(seed=1).requests, cfg)
    assert [r.events for r in other] != [r.events for r in first]


def test_the_routers_own_policies_are_called(monkeypatch):
    """Fails if the simulator carries its own copy of a policy instead of importing the router's."""
    calls = {"pick_decode": 0, "pick_prefill": 0, "pick_colocated": 0, "role": 0, "migration": 0}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapped(*a, **k):
            calls[key] += 1
            return real(*a, **k)
        monkeypatch.setattr(module, name, wrapped)
    spy(placement, "pick_decode", "pick_decode")
    spy(placement, "pick_prefill", "pick_prefill")
    spy(placement, "pick_colocated", "pick_colocated")
    spy(role_policy, "decide", "role")
    spy(migration_policy, "decide", "migration")
    prof = Profile(cost=CostModel(prefill=(0.01, 2e-4, 1e-8), decode=(0.01, 1e-6, 2e-4)), model="m",
                   dtype="float32", num_blocks=300)
    wl = _workload(60, rate=4.0)
    simulate(prof, wl.requests, SimConfig(prefill=1, decode=2, router=RouterConfig(pools="adaptive")))
    simulate(prof, wl.requests, SimConfig(prefill=0, decode=0, colocated=2))
    assert all(calls.values()), calls


def test_instances_order_queues_with_the_engines_policy_object():
    from tandem.sim.clock import EventLoop
    from tandem.sim.simulator import build_instances
    inst = build_instances(EventLoop(), PROFILE, SimConfig(prefill=0, decode=0, colocated=1))[0]
    assert isinstance(inst.policy.policy, SchedulingPolicy)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_engine_queue_policy_runs_deterministically(name):
    prof = Profile(cost=CostModel(prefill=(0.01, 2e-4, 1e-8), decode=(0.01, 1e-6, 2e-4)), model="m",
                   dtype="float32", num_blocks=120)
    cfg = SimConfig(prefill=0, decode=0, colocated=1, queue_policy=name)
    first, _ = simulate(prof, _workload(80, rate=4.0).requests, cfg)
    second, _ = simulate(prof, _workload(80, rate=4.0).requests, cfg)
    assert all(r.ok for r in first)
    assert [r.events for r in first] == [r.events for r in second]


def test_report_is_loadgen_format(tmp_path):
    wl = _workload(20)
    results, stats = simulate(PROFILE, wl.requests, SimConfig(prefill=1, decode=1))
    report = sim_report.build(results, wl, config=SimConfig().describe(), profile_path="p.json", stats=stats,
                              seed=0, options={}, ttft_slo=1.0, tpot_slo=0.1)
    path = str(tmp_path / "sim.json")
    rep.write_json(report, path)
    loaded = rep.load_report(path)
    for k in ("ttft", "tpot", "e2e"):
        assert set(loaded["summary"][k]) == {"mean", "p50", "p90", "p99"}
    assert loaded["summary"]["completed"] == 20 and loaded["summary"]["failed"] == 0
    assert "ttft p99" in rep.compare_table([("a", loaded), ("b", loaded)])


def test_bad_shapes_name_the_flag():
    with pytest.raises(SimConfigError, match="--prefill and --decode"):
        simulate(PROFILE, [], SimConfig(prefill=1, decode=0))
    with pytest.raises(SimConfigError, match="--queue-policy"):
        simulate(PROFILE, [], SimConfig(queue_policy="nope"))


@pytest.mark.parametrize("policy", ["fcfs", "sjf"])
def test_sjf_displaces_in_the_simulator_as_in_the_engine(policy):
    # One slot. A (10-token prompt, 50 tokens) runs from 0; B (2 tokens) arrives at 0.5. Under sjf,
    # B's work (10/32 + 2) x 4 is far below A's ~43 steps left less A's recompute (16/32): B takes
    # the slot at once (A recomputes later); under fcfs B waits for all of A.
    reqs = [spec(0, 0.0, 10, 50), spec(1, 0.5, 10, 2)]
    results, stats = simulate(PROFILE, reqs, SimConfig(prefill=0, decode=0, colocated=1, queue_policy=policy,
                                                       max_num_seqs=1, router=NO_MIGRATION))
    a, b = results
    assert a.ok and b.ok and len(a.events) and len(b.events)
    (inst,) = stats["instances"].values()
    if policy == "sjf":
        assert inst["preemptions"] == 1
        assert b.end_s < a.end_s and b.ttft_s < 0.5      # served while A waits: its prefill 0.2 s after a cut step
    else:
        assert inst["preemptions"] == 0
        assert b.events[0][0] > a.end_s - 1e-9            # B starts only once A is done
