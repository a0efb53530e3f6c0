"""Device and KV-transport flags: worker defaults, validation, and `tandem up` passing them on."""
from __future__ import annotations

import argparse

import pytest

from services.worker.__main__ import parse_args
from tandem.cli_up import _worker_args


def test_worker_defaults_follow_the_machine():
    opts = parse_args(["--role", "decode"])
    assert (opts.device, opts.kv_transport, opts.gpu_memory_utilization) == ("auto", "auto", None)


def test_worker_takes_explicit_device_transport_and_gpu_share():
    opts = parse_args(["--role", "prefill", "--device", "cuda:1", "--kv-transport", "nccl",
                       "--gpu-memory-utilization", "0.85"])
    assert (opts.device, opts.kv_transport, opts.gpu_memory_utilization) == ("cuda:1", "nccl", 0.85)


@pytest.mark.parametrize("argv, message", [
    (["--kv-transport", "rdma"], "invalid choice: 'rdma'"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization 0.0: give a share in (0, 1]"),
    (["--gpu-memory-utilization", "1.5"], "give a share in (0, 1], e.g. 0.9"),
    (["--displace-ratio", "0.5"], "--displace-ratio 0.5: give a ratio >= 1, or 0 to never displace"),
])
def test_worker_refuses_bad_values_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--role", "decode", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tandem_up_passes_device_and_transport_to_every_worker():
    base = dict(dtype="bfloat16", block_size=None, num_blocks=None, kv_memory_gib=None, max_num_batched_tokens=None,
                max_num_seqs=None, max_model_len=None, lease_ms=None, device=None, kv_transport=None, mixed_prefill=None,
                preemption_mode=None, kv_compress_fraction=None, displace_ratio=None)
    assert _worker_args(argparse.Namespace(**base)) == ["--dtype", "bfloat16"]     # workers' own defaults
    args = argparse.Namespace(**dict(base, device="cuda", kv_transport="cuda_ipc"))
    assert _worker_args(args) == ["--dtype", "bfloat16", "--device", "cuda", "--kv-transport", "cuda_ipc"]
    args = argparse.Namespace(**dict(base, mixed_prefill="chunked"))
    assert _worker_args(args) == ["--dtype", "bfloat16", "--mixed-prefill", "chunked"]
    args = argparse.Namespace(**dict(base, preemption_mode="compress", kv_compress_fraction=0.5))
    assert _worker_args(args) == ["--dtype", "bfloat16", "--preemption-mode", "compress", "--kv-compress-fraction", "0.5"]
