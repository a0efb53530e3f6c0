"""Arrival processes: seeded schedules of request offsets in seconds, the first at 0.

Every function returns a non-decreasing float array of `n` offsets starting at 0.0. Random
processes draw only from the `numpy.random.Generator` they are given, so the same generator
state gives the same schedule.
"""
from __future__ import annotations

import numpy as np

KINDS = ("trace", "poisson", "gamma", "constant")


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    out = np.zeros(len(gaps), dtype=float)
    if len(gaps) > 1:
        out[1:] = np.cumsum(gaps[:-1])
    return out


def _check(n: int, rate: float) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")


def poisson(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Exponential inter-arrival gaps of mean 1/rate (CV 1)."""
    _check(n, rate)
    return _from_gaps(rng.exponential(1.0 / rate, size=n))


def gamma(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma inter-arrival gaps of mean 1/rate and coefficient of variation `cv` (> 0).

    cv = 1 is Poisson; cv > 1 is burstier, cv < 1 more regular. Shape k = 1/cv², scale = 1/(rate·k).
    """
    _check(n, rate)
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    return _from_gaps(rng.gamma(shape, 1.0 / (rate * shape), size=n))


def constant(n: int, rate: float) -> np.ndarray:
    """One request every 1/rate seconds."""
    _check(n, rate)
    return np.arange(n, dtype=float) / rate


def from_trace(timestamps_s, time_scale: float = 1.0, rate: float | None = None) -> np.ndarray:
    """Trace timestamps (seconds, any origin) as offsets from the first, keeping their shape.

    `time_scale` multiplies every offset (0.5 replays twice as fast). `rate`, when given, instead
    rescales the offsets so the mean rate over the span is `rate` requests/s; a trace whose
    timestamps are all equal cannot be rescaled and raises ValueError.
    """
    ts = np.asarray(timestamps_s, dtype=float)
    if len(ts) == 0:
        return ts
    if np.any(np.diff(ts) < 0):
        raise ValueError("trace timestamps must be non-decreasing")
    offsets = ts - ts[0]
    if rate is not None:
        _check(len(ts), rate)
        span = offsets[-1]
        if span <= 0:
            raise ValueError("cannot rescale a trace to a rate: all its timestamps are equal")
        # n requests over the span: n-1 gaps of mean span/(n-1) → mean gap 1/rate
        return offsets * ((len(ts) - 1) / rate) / span
    if not time_scale > 0:
        raise ValueError(f"time scale must be > 0, got {time_scale}")
    return offsets * time_scale


def empirical(offsets: np.ndarray) -> tuple[float, float]:
    """(rate in requests/s, inter-arrival CV) of a schedule; NaN where undefined."""
    gaps = np.diff(np.asarray(offsets, dtype=float))
    if len(gaps) == 0 or gaps.mean() <= 0:
        return float("nan"), float("nan")
    return float(1.0 / gaps.mean()), float(gaps.std() / gaps.mean())
