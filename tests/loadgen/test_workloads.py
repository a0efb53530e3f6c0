"""Workloads: the real shared traces, determinism, Mooncake prefix sharing, bad input."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from loadgen.workloads import TOKEN_LOW, WorkloadConfig, WorkloadError, build_workload, load_rows

TRACES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "traces")
if not os.path.isdir(TRACES):
    TRACES = "/work/shared/traces"
AZURE_CONV = os.path.join(TRACES, "AzureLLMInferenceTrace_conv.csv")
AZURE_CODE = os.path.join(TRACES, "AzureLLMInferenceTrace_code.csv")
SHAREGPT = os.path.join(TRACES, "sharegpt_8k_filtered_stats_llama2_tokenizer.csv")
needs_traces = pytest.mark.skipif(not os.path.isfile(AZURE_CONV), reason="shared/traces not present")


@needs_traces
def test_azure_conv_first_rows():
    fmt, rows = load_rows(AZURE_CONV)
    assert fmt == "azure" and len(rows) == 19366
    assert [(r.input_tokens, r.output_tokens) for r in rows[:3]] == [(374, 44), (396, 109), (879, 55)]
    assert rows[1].timestamp_s - rows[0].timestamp_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-5)
    wl = build_workload(WorkloadConfig(trace=AZURE_CONV, max_requests=3))
    assert [r.arrival_s for r in wl.requests] == pytest.approx([0.0, 4.314579, 4.541877], abs=1e-5)


@needs_traces
def test_azure_code_first_rows():
    fmt, rows = load_rows(AZURE_CODE)
    assert fmt == "azure" and len(rows) == 8819
    assert [(r.input_tokens, r.output_tokens) for r in rows[:2]] == [(4808, 10), (3180, 8)]


@needs_traces
def test_sharegpt_stats_with_synthetic_arrivals():
    fmt, rows = load_rows(SHAREGPT)
    assert fmt == "sharegpt" and len(rows) == 30731
    assert (rows[0].input_tokens, rows[0].output_tokens, rows[0].timestamp_s) == (74, 918, None)
    with pytest.raises(WorkloadError, match="needs --rate"):
        build_workload(WorkloadConfig(trace=SHAREGPT, max_requests=10))
    wl = build_workload(WorkloadConfig(trace=SHAREGPT, max_requests=10, rate=5.0, max_output_tokens=64))
    assert wl.requests[0].arrival_s == 0.0 and all(r.output_tokens <= 64 for r in wl.requests)


@needs_traces
def test_clip_scale_rate_and_time_scale():
    base = dict(trace=AZURE_CONV, max_requests=200, vocab_size=512)
    clipped = build_workload(WorkloadConfig(**base, max_input_tokens=256, max_output_tokens=32))
    assert max(r.input_tokens for r in clipped.requests) == 256
    assert min(r.input_tokens for r in clipped.requests) >= 1
    scaled = build_workload(WorkloadConfig(**base, max_input_tokens=256, length_mode="scale"))
    raw = build_workload(WorkloadConfig(**base))
    assert max(r.input_tokens for r in scaled.requests) == 256
    longest = max(r.input_tokens for r in raw.requests)
    for s, r in zip(scaled.requests, raw.requests):           # proportions kept
        assert abs(s.input_tokens - max(1, r.input_tokens * 256 / longest)) <= 1
    fast = build_workload(WorkloadConfig(**base, time_scale=0.5))
    assert fast.requests[-1].arrival_s == pytest.approx(raw.requests[-1].arrival_s / 2)
    at_rate = build_workload(WorkloadConfig(**base, rate=20.0))
    assert at_rate.describe()["offered_rate_rps"] == pytest.approx(20.0)
    assert len(clipped.prompt(clipped.requests[0])) == clipped.requests[0].input_tokens


@needs_traces
def test_same_seed_same_schedule_and_prompts_different_seed_differs():
    def make(seed):
        wl = build_workload(WorkloadConfig(trace=AZURE_CONV, max_requests=50, sample=True, arrival="poisson",
                                           rate=3.0, max_input_tokens=64, vocab_size=512, seed=seed))
        return wl.requests, [wl.prompt(r) for r in wl.requests]
    a, b, c = make(7), make(7), make(8)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert all(TOKEN_LOW <= t < 512 for p in a[1] for t in p)


def test_synthetic_lengths():
    wl = build_workload(WorkloadConfig(trace="synthetic:n=200,input=uniform:10:20,output=choice:4:8",
                                       arrival="constant", rate=10.0, seed=3))
    assert {r.output_tokens for r in wl.requests} == {4, 8}
    assert 10 <= min(r.input_tokens for r in wl.requests) and max(r.input_tokens for r in wl.requests) <= 20
    assert wl.requests[1].arrival_s == pytest.approx(0.1)
    fixed = build_workload(WorkloadConfig(trace="synthetic:n=3,input=5,output=2", arrival="constant", rate=1.0))
    assert [(r.input_tokens, r.output_tokens) for r in fixed.requests] == [(5, 2)] * 3


def _mooncake(tmp_path, rows):
    path = tmp_path / "mooncake.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mooncake_requests_share_exactly_their_common_blocks(tmp_path):
    path = _mooncake(tmp_path, [
        {"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 500, "input_length": 1500, "output_length": 5, "hash_ids": [1, 2, 9]},
        {"timestamp": 1500, "input_length": 600, "output_length": 5, "hash_ids": [4, 5]},
    ])
    wl = build_workload(WorkloadConfig(trace=path, block_tokens=16, vocab_size=1000, seed=5))
    assert wl.format == "mooncake"
    assert [r.arrival_s for r in wl.requests] == [0.0, 0.5, 1.5]
    a, b, c = (wl.prompt(r) for r in wl.requests)
    assert [len(a), len(b), len(c)] == [34, 47, 19]          # lengths scaled by 16/512
    assert a[:32] == b[:32]                                 # blocks 1 and 2 shared
    assert a[32:34] != b[32:34]                             # block 3 vs block 9
    assert a[:16] != c[:16]
    again = build_workload(WorkloadConfig(trace=path, block_tokens=16, vocab_size=1000, seed=5))
    assert [again.prompt(r) for r in again.requests] == [a, b, c]


def test_bad_input_is_named(tmp_path):
    missing = tmp_path / "missing.csv"
    missing.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.68,10\n")
    with pytest.raises(WorkloadError, match="missing column.*GeneratedTokens"):
        build_workload(WorkloadConfig(trace=str(missing)))
    bad_time = tmp_path / "bad_time.csv"
    bad_time.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,10,2\n")
    with pytest.raises(WorkloadError, match=r"bad_time.csv:2: bad timestamp"):
        build_workload(WorkloadConfig(trace=str(bad_time)))
    backwards = tmp_path / "backwards.csv"
    backwards.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47,10,2\n"
                         "2023-11-16 18:15:46,10,2\n")
    with pytest.raises(WorkloadError, match="backwards"):
        build_workload(WorkloadConfig(trace=str(backwards)))
    zeros = tmp_path / "zeros.csv"
    zeros.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,0,2\n"
                     "2023-11-16 18:15:47,10,0\n2023-11-16 18:15:48,10,3\n")
    wl = build_workload(WorkloadConfig(trace=str(zeros)))
    assert len(wl.requests) == 1 and wl.skipped == 2
    with pytest.raises(WorkloadError, match="no such trace file"):
        build_workload(WorkloadConfig(trace=str(tmp_path / "nope.csv")))
    with pytest.raises(WorkloadError, match="missing field 'output_length'"):
        build_workload(WorkloadConfig(trace=_mooncake(tmp_path, [{"timestamp": 0, "input_length": 3}])))


def test_prompt_salt_changes_tokens_only():
    base = WorkloadConfig(trace="synthetic:n=5,input=20,output=3", rate=4.0, vocab_size=300, seed=2)
    plain, salted = build_workload(base), build_workload(dataclasses.replace(base, prompt_salt=3))
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in plain.requests] == \
           [(r.arrival_s, r.input_tokens, r.output_tokens) for r in salted.requests]
    assert all(plain.prompt(a) != salted.prompt(b) for a, b in zip(plain.requests, salted.requests))
    assert [plain.prompt(r) for r in plain.requests] == [build_workload(base).prompt(r) for r in plain.requests]
