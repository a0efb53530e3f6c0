"""The `tandem` command line: `run` JSON lines in/out, input errors exit 2 with a message, `export-model`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.engine.builder import build_engine
from services.engine.sampling_params import SamplingParams
from tandem.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_KV = ["--kv-memory-gib", "0.01"]       # ~1300 blocks of the tiny model instead of 2 GiB


def write_lines(path, lines) -> str:
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def run_cli(capsys, *args):
    """main(["run", ...]) in process → (exit code, stdout JSON lines, stderr)."""
    code = main(["run", *SMALL_KV, *args])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def expect_input_error(capsys, *args) -> str:
    code, lines, err = run_cli(capsys, *args)
    assert code == 2 and lines == []
    assert err.startswith("tandem run: error: ") and "Traceback" not in err
    return err


# ---------------------------------------------------------------- run: happy path
def test_run_writes_one_line_per_prompt_in_order(tmp_path, capsys):
    inputs = [
        {"prompt": "The quick brown fox", "max_tokens": 3},
        {"token_ids": [1, 300, 301, 302, 303, 304]},
        "",                                                     # blank lines are skipped
        {"prompt": "Once upon a time", "max_tokens": 5},
        {"token_ids": [1, 40, 41], "max_tokens": 1},
    ]
    path = write_lines(tmp_path / "in.jsonl", inputs)
    code, lines, err = run_cli(capsys, "--model", "tiny", "--input", path, "--max-tokens", "7", "--ignore-eos")
    assert code == 0
    assert len(lines) == 4
    assert [len(line["token_ids"]) for line in lines] == [3, 7, 5, 1]      # per-line max_tokens honoured
    assert all(line["finish_reason"] == "length" for line in lines)
    assert json.loads(err.strip().splitlines()[-1])["requests"] == 4

    engine = build_engine("tiny", num_blocks=200)
    tok = engine.tokenizer
    prompts = [tok.encode("The quick brown fox"), [1, 300, 301, 302, 303, 304],
               tok.encode("Once upon a time"), [1, 40, 41]]
    expected = engine.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 7, 5, 1)])
    for line, ref in zip(lines, expected):
        assert set(line) == {"token_ids", "text", "finish_reason"}
        assert line["token_ids"] == ref.token_ids
        assert line["text"] == ref.text == tok.decode(ref.token_ids)


def test_run_stops_on_eos_without_ignore_eos(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [{"prompt": "Hello world, this is a test"}])
    code, (line,), _ = run_cli(capsys, "--input", path, "--max-tokens", "60")
    assert code == 0 and line["finish_reason"] == "stop" and line["token_ids"][-1] == 2
    assert len(line["token_ids"]) < 60


def test_run_writes_to_output_file(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [{"token_ids": [1, 5, 6]}, {"token_ids": [1, 7]}])
    out = tmp_path / "out.jsonl"
    code, lines, _ = run_cli(capsys, "--input", path, "--output", str(out), "--max-tokens", "2", "--ignore-eos")
    assert code == 0 and lines == []
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(w["token_ids"]) for w in written] == [2, 2]


# ---------------------------------------------------------------- run: input errors
def test_malformed_json_names_the_line(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [{"prompt": "ok"}, "", '{"prompt": "broken",', {"prompt": "x"}])
    err = expect_input_error(capsys, "--input", path)
    assert "line 3" in err and "not valid JSON" in err


@pytest.mark.parametrize("line", [{"max_tokens": 3}, {"prompt": "a", "token_ids": [1, 2]}, ["prompt"]],
                         ids=["neither", "both", "not-an-object"])
def test_line_needs_exactly_one_of_prompt_and_token_ids(tmp_path, capsys, line):
    path = write_lines(tmp_path / "in.jsonl", [{"prompt": "fine"}, line])
    err = expect_input_error(capsys, "--input", path)
    assert "line 2" in err and '"prompt"' in err and '"token_ids"' in err


@pytest.mark.parametrize("line,needle", [
    ({"prompt": 5}, '"prompt" must be a string'),
    ({"token_ids": [1, "a"]}, '"token_ids" must be a list of integers'),
    ({"prompt": "a", "max_tokens": "3"}, '"max_tokens" must be an integer'),
])
def test_wrongly_typed_fields(tmp_path, capsys, line, needle):
    path = write_lines(tmp_path / "in.jsonl", [line])
    err = expect_input_error(capsys, "--input", path)
    assert "line 1" in err and needle in err


def test_empty_prompt_exits_2_naming_prompt(tmp_path, capsys):
    for empty in ({"token_ids": []}, {"prompt": ""}):
        path = write_lines(tmp_path / "in.jsonl", [{"prompt": "fine"}, empty])
        err = expect_input_error(capsys, "--input", path)
        assert "line 2: prompt is empty" in err


def test_prompt_over_the_context_exits_2(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [{"token_ids": [1] + [50] * 99}])
    err = expect_input_error(capsys, "--model", "tiny", "--max-model-len", "64", "--input", path)
    assert "prompt 1: prompt:" in err and "100 tokens" in err and "64" in err


def test_bad_per_line_and_global_sampling_values_exit_2(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [{"prompt": "a", "max_tokens": 0}])
    assert "max_tokens" in expect_input_error(capsys, "--input", path)
    path = write_lines(tmp_path / "in2.jsonl", [{"prompt": "a"}])
    assert "top_p" in expect_input_error(capsys, "--input", path, "--top-p", "0")
    assert "max_tokens" in expect_input_error(capsys, "--input", path, "--max-tokens", "-1")


def test_missing_or_empty_input_file_exits_2(tmp_path, capsys):
    assert "cannot open" in expect_input_error(capsys, "--input", str(tmp_path / "nope.jsonl"))
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    assert "no prompts" in expect_input_error(capsys, "--input", path)


def test_unknown_model_exits_2_naming_it(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [{"prompt": "a"}])
    err = expect_input_error(capsys, "--model", "no-such-model-xyz", "--input", path)
    assert "no-such-model-xyz" in err


# ---------------------------------------------------------------- export-model
def test_exported_model_gives_the_same_tokens(tmp_path, capsys):
    model_dir = tmp_path / "tiny-hf"
    assert main(["export-model", "tiny", str(model_dir)]) == 0
    capsys.readouterr()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    path = write_lines(tmp_path / "in.jsonl", [{"prompt": "The quick brown fox"}, {"token_ids": [1, 300, 301]},
                                               {"prompt": "Once upon a time", "max_tokens": 4}])
    code_named, named, _ = run_cli(capsys, "--model", "tiny", "--input", path, "--max-tokens", "12")
    code_dir, from_dir, _ = run_cli(capsys, "--model", str(model_dir), "--input", path, "--max-tokens", "12")
    assert code_named == code_dir == 0
    assert from_dir == named
    assert any(len(line["token_ids"]) > 1 for line in named)


def test_export_unknown_model_fails_with_a_message(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["export-model", "nope", str(tmp_path / "x")])
    assert "unknown model 'nope'" in str(e.value.code)
    assert not (tmp_path / "x").exists()


def test_corrupt_tokenizer_exits_2(tmp_path, capsys):
    model_dir = tmp_path / "tiny-hf"
    main(["export-model", "tiny", str(model_dir)])
    capsys.readouterr()
    (model_dir / "tokenizer.json").write_text("{not json")
    path = write_lines(tmp_path / "in.jsonl", [{"prompt": "a"}])
    err = expect_input_error(capsys, "--model", str(model_dir), "--input", path)
    assert "tokenizer.json" in err


# ---------------------------------------------------------------- as a real process
@pytest.mark.slow          # real processes (~6 s)
def test_subprocess_exit_codes_and_no_traceback(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [{"prompt": "hi", "max_tokens": 2}, {"token_ids": [1, 9]}])
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "hi"}, "not json"])
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tandem.cli"]            # the venv's python when pytest runs under it
    ok = subprocess.run([*cmd, "run", *SMALL_KV, "--input", good, "--ignore-eos", "--max-tokens", "3"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert [len(json.loads(line)["token_ids"]) for line in ok.stdout.splitlines()] == [2, 3]
    assert "Traceback" not in ok.stderr

    failed = subprocess.run([*cmd, "run", *SMALL_KV, "--input", bad],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert "line 2" in failed.stderr and "Traceback" not in failed.stderr
    assert failed.stdout == ""
