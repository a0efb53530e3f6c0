"""Metric formulas on hand-made timelines."""
from __future__ import annotations

import pytest

from loadgen.metrics import RequestResult, stats, summarize


def _req(i, scheduled, events, end, error=None, input_tokens=10):
    return RequestResult(i, scheduled, sent_s=scheduled, input_tokens=input_tokens, max_tokens=4,
                         events=events, end_s=end, error=error)


def test_ttft_tpot_e2e_itl():
    r = _req(0, 1.0, [(1.5, 1), (1.7, 1), (2.3, 2)], 2.4)     # 4 tokens: first at 1.5, last at 2.3
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx((2.3 - 1.5) / 3)
    assert r.e2e_s == pytest.approx(1.4)
    assert r.itl_s == pytest.approx([0.2, 0.3, 0.3])          # a 2-token message splits its gap
    assert r.output_tokens == 4
    one = _req(1, 0.0, [(0.2, 1)], 0.2)
    assert one.tpot_s is None and one.itl_s == []
    burst = _req(2, 0.0, [(0.2, 3)], 0.2)                     # all tokens in one message
    assert burst.tpot_s == 0.0 and burst.itl_s == [0.0, 0.0]


def test_percentiles_linear():
    s = stats([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert s == pytest.approx({"mean": 5.5, "p50": 5.5, "p90": 9.1, "p99": 9.91})
    assert stats([]) is None and stats([None]) is None


def test_attainment_goodput_throughput():
    results = [
        _req(0, 0.0, [(0.1, 1), (0.2, 1), (0.3, 1)], 0.3),    # ttft 0.1, tpot 0.1: meets both
        _req(1, 1.0, [(1.5, 1), (1.6, 1)], 1.6),              # ttft 0.5: misses TTFT
        _req(2, 2.0, [(2.1, 1), (2.6, 1), (3.1, 1)], 3.1),    # tpot 0.5: misses TPOT
        _req(3, 3.0, [(3.1, 1)], 3.1),                        # one token: no TPOT, meets both
        _req(4, 3.5, [(3.6, 1)], 4.0, error="boom"),         # failed: counts against attainment
    ]
    s = summarize(results, ttft_slo=0.2, tpot_slo=0.2)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["wall_s"] == pytest.approx(4.0)
    assert s["output_tokens"] == 9
    assert s["throughput_tokens_s"] == pytest.approx(9 / 4.0)
    assert s["attainment_ttft"] == pytest.approx(3 / 5)
    assert s["attainment_tpot"] == pytest.approx(3 / 5)
    assert s["attainment"] == pytest.approx(2 / 5)
    assert s["goodput_requests_s"] == pytest.approx(2 / 4.0)
    assert s["ttft"]["mean"] == pytest.approx((0.1 + 0.5 + 0.1 + 0.1) / 4)
    assert s["tpot"]["p50"] == pytest.approx(0.1)              # over the 3 with n > 1
    assert s["errors"] == {"boom": 1}
    no_slo = summarize(results)
    assert no_slo["attainment"] == pytest.approx(4 / 5)       # only failures miss
    for key in ("ttft", "tpot", "e2e"):
        assert set(s[key]) == {"mean", "p50", "p90", "p99"}
