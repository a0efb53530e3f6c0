"""StepRates: the step time and prefill speed the load record reports (services/engine/step_rates.py)."""
from __future__ import annotations

import pytest

from services.engine.step_rates import StepRates


def test_pure_prefill_steps_measure_tokens_over_time():
    r = StepRates()
    r.observe(0.100, 500, 0)
    assert r.prefill_tokens_per_s == pytest.approx(5000) and r.step_ms == pytest.approx(100)
    r.observe(0.050, 500, 0)                    # 10000 tok/s: the average moves a fifth of the way
    assert r.prefill_tokens_per_s == pytest.approx(6000) and r.step_ms == pytest.approx(90)


def test_a_mixed_step_counts_only_the_time_its_prefill_added():
    r = StepRates()
    r.observe(0.030, 0, 32)                     # decode-only: 30 ms
    r.observe(0.130, 500, 32)                   # the chunk added 100 ms: 5000 tok/s, not 500 / 0.13
    assert r.decode_step_ms == pytest.approx(30) and r.prefill_tokens_per_s == pytest.approx(5000)


def test_a_small_chunk_beside_a_decode_batch_is_not_a_measurement():
    """A colocated instance's capped prefill (16 tokens in a 36 ms step) would read 440 tok/s."""
    r = StepRates()
    r.observe(0.100, 500, 0)
    r.observe(0.032, 0, 40)
    r.observe(0.036, 16, 40)                    # 4 ms of 36: under a third of the step
    assert r.prefill_tokens_per_s == pytest.approx(5000)
    fresh = StepRates()
    fresh.observe(0.036, 16, 40)                # no decode-only step to subtract yet: nothing learned
    assert fresh.prefill_tokens_per_s == 0.0 and fresh.step_ms == pytest.approx(36)


def test_empty_and_zero_length_steps_change_nothing():
    r = StepRates()
    r.observe(0.0, 100, 0)
    r.observe(0.010, 0, 0)
    assert (r.step_ms, r.decode_step_ms, r.prefill_tokens_per_s) == (0.0, 0.0, 0.0)
