"""`tandem profile/simulate/plan` command lines: a report loadgen reads; bad input exits 2 naming the flag."""
from __future__ import annotations

import json

import pytest

from tandem.cli import main
from tandem.sim.costmodel import CostModel, Profile, save_profile

TRACE = "synthetic:n=40,input=uniform:16:300,output=uniform:4:40"


def run(argv: list[str]) -> int:
    """main(argv)'s exit code, argparse's own exits (bad numbers) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def profile(tmp_path):
    path = str(tmp_path / "profile.json")
    save_profile(Profile(cost=CostModel(prefill=(0.01, 2e-4, 1e-8), decode=(0.01, 1e-6, 2e-4)), model="small",
                         dtype="bfloat16", num_blocks=500), path)
    return path


def test_simulate_writes_a_loadgen_report(tmp_path, profile, capsys):
    out = str(tmp_path / "r.json")
    assert main(["simulate", "--profile", profile, "--trace", TRACE, "--rate", "2", "--prefill", "1", "--decode", "1",
                 "--out", out]) == 0
    with open(out) as f:
        report = json.load(f)
    assert report["summary"]["completed"] == 40 and report["target"]["kind"] == "sim"
    from loadgen.__main__ import main as loadgen_main
    assert loadgen_main(["compare", out, out]) == 0
    assert "ttft p99" in capsys.readouterr().out


def test_plan_quick_writes_helm_values(tmp_path, profile, capsys):
    values = str(tmp_path / "values.yaml")
    assert main(["plan", "--profile", profile, "--trace", TRACE, "--rate", "2", "--slo-ttft", "2", "--slo-tpot", "0.1",
                 "--instances", "2", "--quick", "--helm-values", values]) == 0
    import yaml
    with open(values) as f:
        v = yaml.safe_load(f)
    assert v["prefill"]["replicas"] + v["decode"]["replicas"] + v["colocated"]["replicas"] >= 2
    assert v["model"] == {"name": "small", "dtype": "bfloat16"}


@pytest.mark.parametrize("args, flag", [
    (["simulate", "--profile", "{missing}", "--trace", TRACE, "--out", "{out}"], "--profile"),
    (["simulate", "--profile", "{profile}", "--trace", "{missing}", "--out", "{out}"], "--trace"),
    (["simulate", "--profile", "{profile}", "--trace", TRACE, "--rate", "fast", "--out", "{out}"], "--rate"),
    (["simulate", "--profile", "{profile}", "--trace", TRACE, "--rate", "-1", "--out", "{out}"], "--rate"),
    (["simulate", "--profile", "{profile}", "--trace", TRACE, "--prefill", "1", "--decode", "0", "--out", "{out}"],
     "--prefill"),
    (["simulate", "--profile", "{profile}", "--trace", TRACE, "--policies", "balance,nope", "--out", "{out}"],
     "--policies"),
    (["simulate", "--profile", "{profile}", "--trace", TRACE, "--model", "tiny", "--out", "{out}"], "--profile"),
    (["plan", "--profile", "{profile}", "--trace", TRACE, "--slo-ttft", "1", "--slo-tpot", "0.1", "--instances", "1"],
     "--instances"),
    (["plan", "--profile", "{profile}", "--trace", TRACE, "--slo-ttft", "0", "--slo-tpot", "0.1", "--instances", "2"],
     "--slo-ttft"),
    (["plan", "--profile", "{profile}", "--trace", TRACE, "--slo-ttft", "1", "--slo-tpot", "0.1", "--instances", "2",
      "--dtype", "float32"], "--profile"),
])
def test_bad_input_exits_2_naming_the_flag(tmp_path, profile, capsys, args, flag):
    fill = {"missing": str(tmp_path / "missing.file"), "out": str(tmp_path / "o.json"), "profile": profile}
    argv = [a.format(**fill) for a in args]
    if "--rate" not in argv:
        argv += ["--rate", "2"]          # a synthetic trace has no timestamps: arrivals need a rate
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_trace_with_no_usable_rows(tmp_path, profile, capsys):
    trace = tmp_path / "empty.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,0,10\n")
    assert main(["simulate", "--profile", profile, "--trace", str(trace), "--out", str(tmp_path / "o.json")]) == 2
    assert "--trace" in capsys.readouterr().err


def test_unmeetable_slos_say_the_best_attainment(tmp_path, profile, capsys):
    assert main(["plan", "--profile", profile, "--trace", TRACE, "--slo-ttft", "0.0001", "--slo-tpot", "0.0001",
                 "--instances", "2", "--quick", "--rate", "2"]) == 1
    err = capsys.readouterr().err
    assert "no configuration" in err and "best attainment" in err
