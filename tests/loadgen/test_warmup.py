"""`--warmup N`: N unrecorded requests, one at a time, with prompts the measured run never sends."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from loadgen.__main__ import _warm_up
from loadgen.workloads import WorkloadConfig, WorkloadError, build_workload

from .fakes import FakeTarget

CONFIG = WorkloadConfig(trace="synthetic:n=6,input=32,output=3", rate=10.0, vocab_size=500, seed=7)


def test_warm_up_sends_n_requests_sequentially_with_other_prompts():
    run = build_workload(CONFIG)
    warm = build_workload(dataclasses.replace(CONFIG, seed=CONFIG.seed + 1_000_003))
    target = FakeTarget(first_s=0.01, gap_s=0.001)
    asyncio.run(_warm_up(target, warm, 3))
    assert len(target.sends) == len(target.ends) == 3
    # one at a time: each request starts after the previous one ended
    assert all(start >= end for start, end in zip(target.sends[1:], target.ends[:-1]))
    measured = {tuple(run.prompt(spec)) for spec in run.requests}
    assert not measured & {tuple(p) for p in target.prompts}
    assert [len(p) for p in target.prompts] == [spec.input_tokens for spec in warm.requests[:3]]


def test_warm_up_failure_stops_the_run_with_a_clear_message():
    target = FakeTarget(fail_after=1)
    with pytest.raises(WorkloadError, match="warm-up request failed: fake failure mid-stream"):
        asyncio.run(_warm_up(target, build_workload(CONFIG), 2))
    assert len(target.sends) == 1
