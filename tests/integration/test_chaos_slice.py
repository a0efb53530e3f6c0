"""A short seeded slice of `make chaos` (benchmarks/chaos.py): one round of each fault (SIGKILL a
decode worker, a prefill worker and a router, restart Redis) under load from two clients through
the SDK with two router replicas. Every request
ends golden or with a retryable status; none lost, no token duplicated, nothing leaked; the last
line printed is the summary JSON."""
from __future__ import annotations

import json

import pytest

from benchmarks import chaos

pytestmark = pytest.mark.timeout(600)


def test_one_round_of_each_fault_loses_nothing(capsys):
    rc = chaos.main(["--rounds", "1", "--clients", "2", "--fault-gap-s", "2", "--seed", "1"])
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]
    summary = json.loads(lines[-1])          # the last JSON line (a library may print a stray non-JSON line)
    assert set(summary) >= {"sent", "golden", "retryable_failures", "lost", "duplicated_tokens", "leaked"}, lines
    assert summary["sent"] > 0 and summary["golden"] + summary["retryable_failures"] == summary["sent"], lines
    assert (summary["lost"], summary["duplicated_tokens"], summary["leaked"], summary["mismatched"]) == (0, 0, 0, 0), \
        lines
    assert rc == 0
