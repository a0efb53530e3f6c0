"""Arrival processes: empirical rate and CV over seeded samples, determinism, trace rescaling."""
from __future__ import annotations

import numpy as np
import pytest

from loadgen import arrivals


@pytest.mark.parametrize("seed", range(5))
def test_poisson_rate_and_cv(seed):
    rate, cv = arrivals.empirical(arrivals.poisson(20000, 8.0, np.random.default_rng(seed)))
    assert rate == pytest.approx(8.0, rel=0.05)
    assert cv == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("target_cv", [0.5, 2.0, 4.0])
def test_gamma_rate_and_cv(target_cv):
    for seed in range(3):
        rate, cv = arrivals.empirical(arrivals.gamma(50000, 3.0, target_cv, np.random.default_rng(seed)))
        assert rate == pytest.approx(3.0, rel=0.1)
        assert cv == pytest.approx(target_cv, rel=0.1)


def test_constant_and_first_arrival_at_zero():
    offsets = arrivals.constant(5, 4.0)
    assert offsets.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert arrivals.poisson(3, 1.0, np.random.default_rng(0))[0] == 0.0


def test_seeded_and_distinct():
    a = arrivals.gamma(100, 2.0, 3.0, np.random.default_rng(1))
    b = arrivals.gamma(100, 2.0, 3.0, np.random.default_rng(1))
    c = arrivals.gamma(100, 2.0, 3.0, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(np.diff(a) >= 0)


def test_from_trace_scale_and_rate():
    ts = [100.0, 101.0, 103.0, 107.0]
    assert arrivals.from_trace(ts).tolist() == [0.0, 1.0, 3.0, 7.0]
    assert arrivals.from_trace(ts, time_scale=0.5).tolist() == [0.0, 0.5, 1.5, 3.5]
    assert arrivals.from_trace(ts, rate=3.0).tolist() == pytest.approx([0.0, 1 / 7, 3 / 7, 1.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        arrivals.from_trace([2.0, 1.0])
    with pytest.raises(ValueError, match="rate must be > 0"):
        arrivals.poisson(3, 0.0, np.random.default_rng(0))
