"""An instance's prefill speed as the router reads it, one rule for placement and the role policy.

A worker reports its measured prefill tokens per second once it has prefilled something; before
that (a fresh instance) the router assumes DEFAULT_PREFILL_TOKENS_PER_S, low on purpose: an
unmeasured instance should not look faster than measured ones.
"""
from __future__ import annotations

DEFAULT_PREFILL_TOKENS_PER_S = 1000.0


def prefill_rate(report) -> float:
    """report.prefill_tokens_per_s when measured (> 0), else DEFAULT_PREFILL_TOKENS_PER_S."""
    return report.prefill_tokens_per_s if report.prefill_tokens_per_s > 0 else DEFAULT_PREFILL_TOKENS_PER_S
