"""bench-engine's probe arithmetic, on a fake system with a virtual clock (no timing asserted)."""
from __future__ import annotations

from benchmarks import engine_probes


class FakeSystem:
    """prefill costs 1 ms per prompt token; a decode step costs 2 ms + 0.5 ms per sequence."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        monkeypatch.setattr(engine_probes.time, "perf_counter", lambda: self.now)

    def generate(self, prompts, max_tokens):
        self.now += sum(len(p) for p in prompts) * 1e-3 + (max_tokens - 1) * (2e-3 + 0.5e-3 * len(prompts))
        return len(prompts) * max_tokens


def test_decode_latency_cancels_the_prefill(monkeypatch):
    fake = FakeSystem(monkeypatch)
    r = engine_probes.decode_latency(fake.generate, 1000, batch=8, context=64, steps=10, repeats=2)
    assert r["ms_per_token"] == 6.0 and engine_probes.key(r) == "decode b8@64"


def test_prefill_and_throughput(monkeypatch):
    fake = FakeSystem(monkeypatch)
    assert engine_probes.prefill_latency(fake.generate, 1000, 128, repeats=1)["ms"] == 128.0
    r = engine_probes.throughput(fake.generate, 1000, "4x10x3", repeats=1)
    assert r["output_tokens_per_s"] == round(12 / (0.040 + 2 * 0.004), 1)


def test_compare_inverts_latencies_so_above_one_is_faster():
    ours = {"probe": "prefill", "tokens": 512, "ms": 50.0}
    theirs = {"probe": "prefill", "tokens": 512, "ms": 100.0}
    assert engine_probes.compare(ours, theirs)["ratio"] == 2.0
    ours = {"probe": "throughput", "workload": "1x1x1", "output_tokens_per_s": 50.0}
    theirs = {"probe": "throughput", "workload": "1x1x1", "output_tokens_per_s": 100.0}
    assert engine_probes.compare(ours, theirs) == {"compare": "throughput 1x1x1", "tandem": 50.0, "vllm": 100.0,
                                                   "unit": "output tok/s", "ratio": 0.5}


def test_best_by_probe_keeps_each_probes_fastest_round():
    r1 = [{"probe": "throughput", "workload": "1x1x1", "output_tokens_per_s": 90.0},
          {"probe": "decode", "batch": 1, "context": 8, "ms_per_token": 5.0}, {"system": "x", "skipped": "why"}]
    r2 = [{"probe": "throughput", "workload": "1x1x1", "output_tokens_per_s": 100.0},
          {"probe": "decode", "batch": 1, "context": 8, "ms_per_token": 6.0},
          {"probe": "prefill", "tokens": 128, "ms": 3.0}]
    best = engine_probes.best_by_probe([r1, r2])
    assert [engine_probes.key(r) for r in best] == ["throughput 1x1x1", "decode b1@8", "prefill 128"]
    assert [best[0]["output_tokens_per_s"], best[1]["ms_per_token"], best[2]["ms"]] == [100.0, 5.0, 3.0]
