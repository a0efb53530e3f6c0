"""An instance's prefill speed as the router reads it from the load record (services/load.py): the
one place that says what an unmeasured rate counts as.

A worker reports its measured prefill tokens per second (`LoadReport.prefill_tokens_per_s`) once
it has prefilled something; 0 means not measured yet. The readers need different answers for the
unmeasured, on purpose:

- placement and the role policy ask "how soon would THIS instance finish a prompt":
  `prefill_rate` assumes DEFAULT_PREFILL_TOKENS_PER_S, low on purpose, so an unmeasured instance
  never looks faster than measured ones;
- the autoscaler asks "how fast does the POOL drain its queue": `pool_prefill_rate` counts an
  unmeasured instance at the mean of the measured ones (a replica just added is as fast as its
  peers, not a tenth of them, or the autoscaler would add more); None when nothing is measured;
- admission asks "how soon could ANY instance start a prompt": `fastest_prefill_rate`, measured
  rates only; None when nothing is measured.
"""
from __future__ import annotations

from collections.abc import Iterable

DEFAULT_PREFILL_TOKENS_PER_S = 1000.0


def prefill_rate(report) -> float:
    """report.prefill_tokens_per_s when measured (> 0), else DEFAULT_PREFILL_TOKENS_PER_S."""
    return report.prefill_tokens_per_s if report.prefill_tokens_per_s > 0 else DEFAULT_PREFILL_TOKENS_PER_S


def _measured(reports: Iterable) -> list[float]:
    return [r.prefill_tokens_per_s for r in reports if r.prefill_tokens_per_s > 0]


def pool_prefill_rate(reports: Iterable) -> float | None:
    """The summed rate of `reports`, the unmeasured counted at the mean of the measured; None when
    none is measured."""
    reports = list(reports)
    rates = _measured(reports)
    return sum(rates) / len(rates) * len(reports) if rates else None


def fastest_prefill_rate(reports: Iterable) -> float | None:
    """The highest measured rate among `reports`; None when none is measured."""
    return max(_measured(reports), default=None)
