"""`--dtype auto` and the checks on an explicit dtype: a table over capability sets (no device
touched), host detection, and the flags that take it."""
from __future__ import annotations

import logging

import pytest

from services.engine.config import ModelConfigError
from services.engine.dtype_policy import (
    DTYPE_CHOICES, DeviceCaps, _cpu_info, detect_capabilities, dtype_problem, resolve_dtype, slower_dtype_warning)

AVX2 = DeviceCaps.cpu({"sse4_2", "avx", "avx2", "fma"})
AVX512 = DeviceCaps.cpu({"avx2", "avx512f", "avx512bw", "avx512vl"})                   # Skylake-SP, Ice Lake
AVX512_BF16 = DeviceCaps.cpu({"avx2", "avx512f", "avx512_bf16"})                       # Cooper Lake, Zen 4
AMX = DeviceCaps.cpu({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})       # Sapphire Rapids
AMX_ONLY = DeviceCaps.cpu({"avx2", "avx512f", "amx_tile", "amx_bf16"})
BARE_CPU = DeviceCaps.cpu()                                                            # no /proc/cpuinfo
SM90 = DeviceCaps.cuda((9, 0), name="NVIDIA H100")
SM80 = DeviceCaps.cuda((8, 0), name="NVIDIA A100")
SM75 = DeviceCaps.cuda((7, 5), name="Tesla T4")
SM70 = DeviceCaps.cuda((7, 0), name="Tesla V100")
SM61 = DeviceCaps.cuda((6, 1), name="GTX 1080")


@pytest.mark.parametrize("caps, dtype, reason", [
    (AVX2, "float32", "no native bfloat16 matmul"),
    (AVX512, "float32", "no native bfloat16 matmul"),
    (BARE_CPU, "float32", "no native bfloat16 matmul"),
    (AVX512_BF16, "bfloat16", "AVX512_BF16"),
    (AMX, "bfloat16", "AMX-BF16"),
    (AMX_ONLY, "bfloat16", "AMX-BF16"),
    (SM90, "bfloat16", "NVIDIA H100 (sm_90) has native bfloat16"),
    (SM80, "bfloat16", "sm_80"),
    (SM75, "float16", "Tesla T4 (sm_75) has no native bfloat16"),
    (SM70, "float16", "no native bfloat16"),
    (SM61, "float32", "no tensor cores"),
    (DeviceCaps.cuda((8, 0), bf16=False), "float16", "no native bfloat16"),   # what torch says wins
])
def test_auto_resolves_from_capabilities(caps, dtype, reason):
    choice = resolve_dtype("auto", caps)
    assert choice.dtype == dtype
    assert reason in choice.reason
    got_dtype, got_reason = choice                      # a plain (dtype, reason) pair too
    assert (got_dtype, got_reason) == (dtype, choice.reason)
    assert slower_dtype_warning("auto", caps) is None
    assert slower_dtype_warning(dtype, caps) is None    # what auto picks is never warned about


@pytest.mark.parametrize("caps", [AVX2, AVX512, AVX512_BF16, AMX, SM90, SM80, SM75])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_explicit_dtype_is_kept_or_refused(caps, dtype):
    problem = dtype_problem(dtype, caps)
    if problem is None:
        assert resolve_dtype(dtype, caps) == (dtype, "asked for with --dtype")
    else:
        with pytest.raises(ModelConfigError) as e:
            resolve_dtype(dtype, caps)
        assert str(e.value) == problem


@pytest.mark.parametrize("caps", [AVX2, AVX512, AVX512_BF16, AMX])
def test_float16_on_a_cpu_is_a_clear_error_naming_what_to_use(caps):
    with pytest.raises(ModelConfigError, match="float16 has no native matmul on a CPU") as e:
        resolve_dtype("float16", caps)
    assert f"use --dtype auto (here {resolve_dtype('auto', caps).dtype})" in str(e.value)


@pytest.mark.parametrize("caps", [SM75, SM70])
def test_bfloat16_on_a_gpu_without_it_names_float16(caps):
    with pytest.raises(ModelConfigError, match=r"\(sm_7\d\) has no native bfloat16; use --dtype float16"):
        resolve_dtype("bfloat16", caps)
    assert resolve_dtype("float16", caps).dtype == "float16"


@pytest.mark.parametrize("name", ["fp16", "bf16", "float64", "int8", "", "Auto"])
def test_unknown_dtype_names_the_choices(name):
    for caps in (AVX2, SM80):
        with pytest.raises(ModelConfigError, match=f"dtype {name!r} is not supported; use one of "
                                                   "auto, float32, bfloat16, float16"):
            resolve_dtype(name, caps)
        assert slower_dtype_warning(name, caps) is None


@pytest.mark.parametrize("caps, requested, faster", [
    (AVX2, "bfloat16", "float32"),          # emulated bf16: ~8x slower (measured)
    (AVX512, "bfloat16", "float32"),
    (AMX, "float32", "bfloat16"),
    (SM80, "float32", "bfloat16"),          # no TF32: 8-16x slower than the tensor cores
    (SM75, "float32", "float16"),
])
def test_explicit_dtype_far_slower_here_warns_naming_the_faster_one(caps, requested, faster):
    warning = slower_dtype_warning(requested, caps)
    assert warning is not None
    assert warning.startswith(f"--dtype {requested} is far slower on ")
    assert warning.endswith(f"use --dtype {faster} (or auto)")
    assert resolve_dtype(requested, caps).dtype == requested      # still runs: a warning, not an error


@pytest.mark.parametrize("caps, requested", [
    (AVX512_BF16, "float32"),   # ~2x: not "far"
    (SM90, "float16"),          # same tensor-core speed as bfloat16
    (SM61, "float16"),          # auto's float32 there is no faster
    (AVX2, "float16"),          # refused, not warned
    (SM75, "bfloat16"),         # refused, not warned
])
def test_no_warning_within_reach_or_when_refused(caps, requested):
    assert slower_dtype_warning(requested, caps) is None


def test_one_list_of_choices_for_every_flag():
    from services.worker.__main__ import parse_args
    from tandem.cli import build_parser

    assert DTYPE_CHOICES == ("auto", "float32", "bfloat16", "float16")
    assert parse_args(["--role", "decode"]).dtype == "auto"
    assert build_parser().parse_args(["run", "--input", "-"]).dtype == "auto"
    assert build_parser().parse_args(["up"]).dtype == "auto"
    for dtype in DTYPE_CHOICES:
        assert parse_args(["--role", "decode", "--dtype", dtype]).dtype == dtype


@pytest.mark.parametrize("argv", [["run", "--input", "-"], ["up"]])
def test_cli_refuses_an_unknown_dtype_without_a_traceback(argv, capsys):
    from tandem.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--dtype", "fp16"])
    assert e.value.code == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_cpuinfo_flags_and_model_name(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    flags, name = _cpu_info(str(path))
    assert flags == {"fpu", "avx2", "avx512f", "avx512_bf16"} and name == "AMD EPYC 9R14"
    reason = resolve_dtype("auto", DeviceCaps.cpu(flags, name)).reason
    assert reason.startswith("this CPU (AMD EPYC 9R14) has AVX512_BF16")
    assert _cpu_info(str(tmp_path / "missing")) == (frozenset(), "")


def test_detect_this_cpu_without_touching_cuda():
    import torch

    caps = detect_capabilities("cpu")
    assert caps.device_type == "cpu" and caps.cuda_capability is None
    assert resolve_dtype("auto", caps).dtype in ("float32", "bfloat16")
    assert not torch.cuda.is_initialized()


def test_build_engine_logs_its_choice_and_why(caplog):
    from services.engine.builder import build_engine

    expected = resolve_dtype("auto", detect_capabilities("cpu"))
    with caplog.at_level(logging.INFO, logger="services.engine.builder"):
        engine = build_engine("tiny", device="cpu", num_blocks=16)
    assert str(engine.config.dtype) == f"torch.{expected.dtype}"
    assert f"dtype {expected.dtype} (--dtype auto on cpu): {expected.reason}" in caplog.text


def test_build_engine_refuses_float16_on_cpu_and_unknown_names():
    from services.engine.builder import build_engine

    with pytest.raises(ModelConfigError, match="float16 has no native matmul on a CPU"):
        build_engine("tiny", dtype="float16", device="cpu", num_blocks=16)
    with pytest.raises(ModelConfigError, match="dtype 'half' is not supported"):
        build_engine("tiny", dtype="half", device="cpu", num_blocks=16)


def test_build_engine_warns_when_an_explicit_dtype_is_far_slower_here(caplog, monkeypatch):
    """bfloat16 asked for on an AVX2-only host: it runs (no silent fallback), and the log says
    float32 is faster."""
    from services.engine import dtype_policy
    from services.engine.builder import build_engine

    monkeypatch.setattr(dtype_policy, "detect_capabilities", lambda device: AVX2)
    with caplog.at_level(logging.INFO, logger="services.engine.builder"):
        engine = build_engine("tiny", dtype="bfloat16", device="cpu", num_blocks=16)
    assert str(engine.config.dtype) == "torch.bfloat16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [slower_dtype_warning("bfloat16", AVX2)]
    assert "use --dtype float32 (or auto)" in warnings[0]


def test_helm_chart_takes_the_same_choices_and_defaults_to_auto():
    import json
    from pathlib import Path

    import yaml

    chart = Path(__file__).resolve().parents[2] / "k8s" / "tandem"
    schema = json.loads((chart / "values.schema.json").read_text())
    assert tuple(schema["properties"]["model"]["properties"]["dtype"]["enum"]) == DTYPE_CHOICES
    assert yaml.safe_load((chart / "values.yaml").read_text())["model"]["dtype"] == "auto"


def test_auto_dtype_of_this_host():
    from services.engine.dtype_policy import auto_dtype

    assert auto_dtype() == resolve_dtype("auto", detect_capabilities("cpu")).dtype
