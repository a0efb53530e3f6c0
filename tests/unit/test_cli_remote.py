"""`tandem generate` and `tandem admin instances` against a real gRPC server with a scripted backend:
streamed text and summary, --json shapes, error messages and exit codes, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from tandem.cli import main
from tests.unit.test_client import ScriptedRouter, serve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def router():
    return ScriptedRouter()


@pytest.fixture
def addr(router):
    with serve(router) as address:
        yield address


def test_generate_streams_text_then_summary(addr, router, capsys):
    assert main(["generate", "--addr", addr, "--prompt", "Hello", "--max-tokens", "4",
                 "--temperature", "0", "--top-p", "0.9", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hell\n"
    assert err.startswith("tokens=4 finish_reason=length ttft_s=") and "tpot_s=" in err
    params = router.requests[0].params
    assert params.max_tokens == 4 and params.seed == 3 and params.top_p == pytest.approx(0.9)
    assert params.HasField("temperature") and params.temperature == 0.0


def test_generate_json(addr, router, capsys):
    assert main(["generate", "--addr", addr, "--token-ids", "72,105", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert {"token_ids", "text", "finish_reason", "ttft_s", "tpot_s"} <= result.keys()
    assert result["token_ids"] == [72, 105] and result["text"] == "Hi" and result["finish_reason"] == "length"
    assert result["ttft_s"] > 0 and result["tpot_s"] >= 0 and err == ""
    assert not router.requests[0].params.HasField("temperature")      # unset: the server's default


@pytest.mark.parametrize("code, exit_code", [(grpc.StatusCode.INVALID_ARGUMENT, 2),
                                             (grpc.StatusCode.RESOURCE_EXHAUSTED, 1)])
def test_generate_errors_print_status_and_exit(addr, router, capsys, code, exit_code):
    router.fail_first = [(code, "params.max_tokens must be > 0")]
    assert main(["generate", "--addr", addr, "--prompt", "x", "--max-tokens", "0"]) == exit_code
    out, err = capsys.readouterr()
    assert err == f"tandem generate: {code.name}: params.max_tokens must be > 0\n" and out == ""


def test_generate_timeout_exits_1(addr, router, capsys):
    router.delay_s = 0.05
    assert main(["generate", "--addr", addr, "--token-ids", ",".join(["65"] * 200), "--max-tokens", "200",
                 "--timeout", "0.2", "--json"]) == 1
    assert capsys.readouterr().err.startswith("tandem generate: DEADLINE_EXCEEDED: ")


def test_generate_argument_errors_exit_2(addr, capsys):
    for argv in (["generate", "--addr", addr],                                      # no prompt
                 ["generate", "--addr", addr, "--prompt", "a", "--token-ids", "1"],  # both
                 ["generate", "--addr", addr, "--token-ids", "1,x"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_admin_instances_table(addr, capsys):
    assert main(["admin", "--addr", addr, "instances"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "ROLE", "STATE", "ADDRESS", "FREE/TOTAL", "RUNNING", "WAITING", "QUEUED",
                                "STEP_MS", "LEASES", "SWITCHES"]
    assert lines[1].split() == ["prefill-0", "prefill", "serving", "127.0.0.1:7001", "90/100", "1", "2", "0", "3.5",
                                "0", "0"]
    assert lines[2].split() == ["decode-0", "decode", "draining", "127.0.0.1:7002", "150/200", "4", "0", "0", "0.0",
                                "0", "0"]
    assert lines[1].index("prefill ") == lines[0].index("ROLE")                     # aligned columns


def test_admin_instances_watch_reprints_until_ctrl_c(addr, capsys, monkeypatch):
    import time
    naps = []

    def nap(seconds):
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(time, "sleep", nap)
    assert main(["admin", "--addr", addr, "instances", "--watch", "0.5"]) == 0
    out = capsys.readouterr().out
    assert naps == [0.5, 0.5] and out.count("FREE/TOTAL") == 2
    assert main(["admin", "--addr", addr, "instances", "--watch", "0"]) == 2


def test_admin_instances_json(addr, capsys):
    assert main(["admin", "--addr", addr, "instances", "--json"]) == 0
    instances = json.loads(capsys.readouterr().out)
    assert isinstance(instances, list) and len(instances) == 2
    for inst in instances:
        assert {"id", "role", "address", "state", "free_blocks", "total_blocks", "running", "waiting"} <= inst.keys()
    assert instances[0]["kv_address"] == "127.0.0.1:8001" and instances[0]["step_time_ms"] == 3.5
    assert instances[1]["role"] == "decode" and instances[1]["reserved_blocks"] == 10


def test_admin_unreachable_exits_1(capsys):
    with serve(ScriptedRouter()) as dead:
        pass                                                                        # the port is free again
    assert main(["admin", "--addr", dead, "instances", "--json"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("tandem admin instances: UNAVAILABLE: ") and out == ""


@pytest.mark.slow          # real processes (~4 s)
def test_subprocess_generate_and_error_without_traceback(addr, router):
    def tandem(*args):
        return subprocess.run([sys.executable, "-m", "tandem.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    ok = tandem("generate", "--addr", addr, "--token-ids", "79,75")
    assert ok.returncode == 0 and ok.stdout == "OK\n" and "tokens=2" in ok.stderr
    router.fail_first = [(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")]
    bad = tandem("generate", "--addr", addr, "--prompt", "")
    assert bad.returncode == 2 and bad.stderr == "tandem generate: INVALID_ARGUMENT: prompt is empty\n"
