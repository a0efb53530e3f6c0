"""The open-loop runner, the sim: hook and goodput search, against fake targets."""
from __future__ import annotations

import asyncio
import io
import json

import pytest

from loadgen import targets
from loadgen.__main__ import main
from loadgen.metrics import summarize
from loadgen.runner import STOPPED, run, run_sequential
from loadgen.workloads import WorkloadConfig, build_workload

from .fakes import FakeTarget


def _workload(n, rate, output=3):
    return build_workload(WorkloadConfig(trace=f"synthetic:n={n},input=8,output={output}", arrival="constant",
                                         rate=rate, vocab_size=100))


def _run(workload, target, **kwargs):
    """(results, wall, send offsets, end offsets) with offsets on the runner's clock (approximately)."""
    async def go():
        t0 = asyncio.get_running_loop().time()
        results, wall = await asyncio.wait_for(run(workload, target, out=io.StringIO(), **kwargs), 60)
        return results, wall, [t - t0 for t in target.sends], [t - t0 for t in target.ends]
    return asyncio.run(go())


def test_slow_target_does_not_delay_later_sends():
    """No request is answered before all ten were sent: a runner that waited for answers would
    never finish (wait_for turns that into a failure). How closely sends follow the schedule is a
    speed figure: benchmarks/bench_loadgen_schedule.py measures it."""
    wl = _workload(10, rate=20.0)                       # one send every 50 ms
    target = FakeTarget(hold_until_sends=10)
    results, _, sends, _ = _run(wl, target)
    scheduled = [r.arrival_s for r in wl.requests]
    assert len(sends) == 10 and sends == sorted(sends)
    for sent, due in zip(sends, scheduled):
        assert sent >= due - 0.005                      # never before its time
    assert all(r.ok and r.output_tokens == 3 for r in results)
    # latency runs from the scheduled time: every first token came after the last send (event
    # order on the runner's own clock; no tolerance, no duration)
    last_send = max(r.sent_s for r in results)
    assert all(r.events[0][0] >= last_send for r in results)
    assert all(r.ttft_s >= last_send - r.scheduled_s for r in results)


def test_concurrency_cap_only_when_asked_and_counts_as_latency():
    wl = _workload(4, rate=100.0, output=1)
    target = FakeTarget(first_s=0.02)
    results, _, sends, ends = _run(wl, target, max_concurrency=1)
    assert len(sends) == len(ends) == 4
    for i in range(3):                                   # one at a time: each send follows the previous end
        assert sends[i + 1] >= ends[i]
    # the wait behind the cap counts: request 3's first token came after request 2's last one
    # (the runner frees the slot only after recording it), and its TTFT includes that wait
    assert results[3].events[0][0] >= results[2].events[-1][0]
    assert results[3].ttft_s >= results[2].events[-1][0] - results[3].scheduled_s


def test_failures_are_counted_and_the_run_finishes():
    wl = _workload(5, rate=100.0, output=4)
    results, _, _, _ = _run(wl, FakeTarget(fail_after=2))
    s = summarize(results)
    assert (s["completed"], s["failed"]) == (0, 5)
    assert s["errors"] == {"fake failure mid-stream": 5}
    assert all(r.output_tokens == 2 for r in results)


def test_sim_without_a_simulator_is_a_clear_error(tmp_path, capsys):
    targets.unregister_simulator()
    with pytest.raises(ValueError, match="no simulator is registered"):
        targets.open_target("sim:cfg.yaml")
    rc = main(["run", "--target", "sim:cfg.yaml", "--trace", "synthetic:n=1,input=1,output=1", "--rate", "1",
               "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "no simulator is registered" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown target"):
        targets.open_target("ftp://x")


@pytest.fixture
def capacity_sim():
    """sim:… → a target serving one request at a time in 20 ms: capacity 50 requests/s."""
    configs = []

    def factory(config):
        configs.append(config)
        return FakeTarget(first_s=0.02, slots=1, vocab=64)
    targets.register_simulator(factory)
    yield configs
    targets.unregister_simulator()


@pytest.mark.slow          # real-time load runs (~12 s)
def test_goodput_search_finds_known_capacity(tmp_path, capacity_sim):
    out = tmp_path / "r.json"
    rc = main(["run", "--target", "sim:one-slot", "--trace", "synthetic:n=40,input=4,output=1",
               "--arrival", "constant", "--rate", "10", "--ttft-slo", "0.1", "--search-goodput",
               "--search-steps", "4", "--no-progress", "--out", str(out), "--csv", str(tmp_path / "r.csv"),
               "--plot", str(tmp_path / "r.png")])
    assert rc == 0 and capacity_sim == ["one-slot"]
    report = json.loads(out.read_text())
    search = report["search"]
    # Below 50 req/s nothing queues; at r > 50, request i waits i·(0.02 − 1/r): 90% meet 0.1 s up to ≈ 57 req/s.
    assert 35 <= search["best_rate_rps"] <= 65
    rates = [p["rate"] for p in search["probes"]]
    assert rates[:3] == [10, 20, 40]
    assert report["summary"]["attainment"] >= 0.9
    assert report["summary"]["completed"] == 40
    assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r_search.png").stat().st_size > 0
    assert (tmp_path / "r.csv").read_text().count("\n") == 41


@pytest.mark.slow          # real-time load runs (~6 s)
def test_goodput_search_that_runs_out_of_bracket_steps_reports_a_lower_bound(tmp_path, capacity_sim):
    out = tmp_path / "r.json"
    rc = main(["run", "--target", "sim:one-slot", "--trace", "synthetic:n=20,input=4,output=1",
               "--arrival", "constant", "--rate", "5", "--ttft-slo", "0.1", "--search-goodput",
               "--bracket-steps", "1", "--search-steps", "3", "--no-progress", "--out", str(out)])
    assert rc == 0
    search = json.loads(out.read_text())["search"]
    # 5 and 10 req/s are far below the 50 req/s capacity: one doubling, still passing, no bisection
    assert [p["rate"] for p in search["probes"]] == [5, 10]
    assert search["best_rate_rps"] == 10 and search["bracketed"] is False


def test_goodput_search_probes_never_resend_a_prompt(tmp_path):
    """Each probe gets fresh prompt tokens (same lengths): a re-sent prompt would hit the prefix
    cache the previous probe filled and make later, faster probes look cheap."""
    made = []

    def factory(config):
        made.append(FakeTarget(first_s=0.001, vocab=500))
        return made[-1]
    targets.register_simulator(factory)
    try:
        rc = main(["run", "--target", "sim:x", "--trace", "synthetic:n=6,input=12,output=1", "--arrival", "constant",
                   "--rate", "50", "--ttft-slo", "1", "--search-goodput", "--bracket-steps", "2", "--search-steps", "0",
                   "--no-progress", "--out", str(tmp_path / "r.json")])
    finally:
        targets.unregister_simulator()
    assert rc == 0
    prompts = [tuple(p) for p in made[0].prompts]
    assert len(prompts) == 18 and len(set(prompts)) == 18                 # 3 probes × 6 requests, all distinct
    assert sorted(len(p) for p in prompts[:6]) == sorted(len(p) for p in prompts[6:12])


def test_stop_ends_the_run_cancels_what_is_in_flight_and_marks_it():
    wl = _workload(6, rate=1000.0, output=3)
    target = FakeTarget(hold_until_sends=100)            # nothing is ever answered
    calls = []

    def stop(results, now):
        calls.append(sum(r.sent_s is not None for r in results))
        return calls[-1] == 6                            # once everything was sent

    results, _, sends, ends = _run(wl, target, stop=stop)
    assert len(sends) == 6 and ends == []
    assert all(r.error == STOPPED and r.end_s is not None and not r.ok for r in results)
    assert summarize(results)["failed"] == 6


def test_stop_that_never_fires_changes_nothing():
    wl = _workload(4, rate=1000.0, output=2)
    results, *_ = _run(wl, FakeTarget(), stop=lambda results, now: False)
    assert all(r.ok and r.output_tokens == 2 for r in results)


class InfoTarget(FakeTarget):
    async def stream(self, prompt, max_tokens, info=None):
        info["prefill_s"] = 0.25
        async for n in super().stream(prompt, max_tokens):
            yield n


def test_run_sequential_one_at_a_time_with_what_the_target_reports():
    wl = _workload(3, rate=1000.0, output=2)
    target = InfoTarget(first_s=0.01)

    async def go():
        return await run_sequential(wl, target)
    results = asyncio.run(go())
    assert [r.output_tokens for r in results] == [2, 2, 2]
    assert all(r.scheduled_s == 0.0 and r.ttft_s > 0 for r in results)       # each timed from its own send
    assert all(target.sends[i + 1] >= target.ends[i] for i in range(2))
    assert results[0].info == {"prefill_s": 0.25} and results[0].row()["prefill_s"] == 0.25


def test_grpc_target_notes_the_ttft_breakdown_and_instances():
    from types import SimpleNamespace

    from loadgen.targets import _note
    info: dict = {}
    _note(info, SimpleNamespace(prefill_instance="prefill-0", decode_instance="decode-0", ttft_breakdown=None))
    _note(info, SimpleNamespace(prefill_instance="", decode_instance="", ttft_breakdown={
        "queue_s": 0.001, "prefill_s": 0.17, "transfer_s": 0.0, "first_decode_s": 0.02, "kv_bytes": 6553600}))
    assert info == {"prefill_instance": "prefill-0", "decode_instance": "decode-0", "queue_s": 0.001,
                    "prefill_s": 0.17, "transfer_s": 0.0, "first_decode_s": 0.02, "kv_bytes": 6553600}


def test_a_stop_rule_that_raises_ends_the_run_with_its_error():
    def stop(results, now):
        raise RuntimeError("bad rule")

    with pytest.raises(RuntimeError, match="bad rule"):
        _run(_workload(3, rate=1000.0), FakeTarget(hold_until_sends=100), stop=stop)
