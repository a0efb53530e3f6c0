"""Per-request latencies from token timelines, and the aggregates a report states.

Times are seconds on one monotonic clock. A request's latencies count from its *scheduled*
send time, so time a request spent waiting behind a concurrency cap or a late event loop is
latency, not hidden (no coordinated omission).

- TTFT: first token − scheduled.   E2E: end − scheduled.
- TPOT: (t_last − t_first) / (n − 1) over the n output tokens; None when n ≤ 1.
- ITL: n − 1 gaps; a message carrying k tokens contributes k gaps of (its gap / k), the first
  message's extra tokens gaps of 0.
- A request meets the SLOs when it completed, TTFT ≤ ttft_slo and TPOT ≤ tpot_slo (a missing
  TPOT, n ≤ 1, meets any TPOT SLO). Attainment is over all requests, failed ones included.
- Goodput: requests meeting both SLOs per second of wall time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

QUANTILES = (50, 90, 99)
# Per-request server facts a target may report (a Tandem router's TTFT breakdown: queue at the
# prefill instance, prefill compute, the KV transfer's non-overlapped tail, the decode side's first
# step; empty for servers that report none). The CSV always has these columns, then any others.
INFO_COLUMNS = ("queue_s", "prefill_s", "transfer_s", "first_decode_s", "kv_bytes", "prefill_instance",
                "decode_instance")


@dataclass
class RequestResult:
    index: int
    scheduled_s: float                  # offset from run start
    sent_s: float | None = None
    input_tokens: int = 0
    max_tokens: int = 0
    events: list[tuple[float, int]] = field(default_factory=list)   # (arrival offset, tokens)
    end_s: float | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)   # what the server reported (see INFO_COLUMNS)

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None

    @property
    def output_tokens(self) -> int:
        return sum(n for _, n in self.events)

    @property
    def ttft_s(self) -> float | None:
        return self.events[0][0] - self.scheduled_s if self.events else None

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens
        if n <= 1:
            return None
        return (self.events[-1][0] - self.events[0][0]) / (n - 1)

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.scheduled_s

    @property
    def itl_s(self) -> list[float]:
        gaps: list[float] = []
        for i, (t, k) in enumerate(self.events):
            if i == 0:
                gaps.extend([0.0] * (k - 1))
            else:
                gaps.extend([(t - self.events[i - 1][0]) / k] * k)
        return gaps

    def meets(self, ttft_slo: float | None, tpot_slo: float | None) -> bool:
        if not self.ok:
            return False
        ttft_ok = ttft_slo is None or (self.ttft_s is not None and self.ttft_s <= ttft_slo)
        tpot_ok = tpot_slo is None or self.tpot_s is None or self.tpot_s <= tpot_slo
        return ttft_ok and tpot_ok

    def row(self) -> dict:
        """The per-request CSV row."""
        return {"index": self.index, "scheduled_s": self.scheduled_s, "sent_s": self.sent_s,
                "input_tokens": self.input_tokens, "max_tokens": self.max_tokens,
                "output_tokens": self.output_tokens, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s,
                "e2e_s": self.e2e_s, "itl_max_s": max(self.itl_s, default=None), "error": self.error or "",
                **{k: self.info.get(k) for k in INFO_COLUMNS},
                **{k: v for k, v in sorted(self.info.items()) if k not in INFO_COLUMNS}}


def stats(values) -> dict | None:
    """mean, p50, p90, p99 (linear interpolation) of `values`; None when there are none."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if a.size == 0:
        return None
    out = {"mean": float(a.mean())}
    out.update({f"p{q}": float(np.percentile(a, q)) for q in QUANTILES})
    return out


def wall_s(results: list[RequestResult]) -> float:
    """First scheduled send → last end (or last scheduled send when nothing ended)."""
    if not results:
        return 0.0
    start = min(r.scheduled_s for r in results)
    ends = [r.end_s for r in results if r.end_s is not None] + [r.scheduled_s for r in results]
    return max(ends) - start


def summarize(results: list[RequestResult], ttft_slo: float | None = None,
              tpot_slo: float | None = None, wall: float | None = None) -> dict:
    """The report's `summary`: latency stats over completed requests, throughput, SLO attainment, goodput."""
    done = [r for r in results if r.ok]
    wall = wall_s(results) if wall is None else wall
    out_tokens = sum(r.output_tokens for r in done)
    n = len(results)
    met = sum(r.meets(ttft_slo, tpot_slo) for r in results)
    per_s = (lambda x: x / wall) if wall > 0 else (lambda x: 0.0)
    return {
        "requests": n, "completed": len(done), "failed": n - len(done), "wall_s": wall,
        "ttft": stats(r.ttft_s for r in done), "tpot": stats(r.tpot_s for r in done),
        "e2e": stats(r.e2e_s for r in done), "itl": stats(g for r in done for g in r.itl_s),
        "input_tokens": sum(r.input_tokens for r in done), "output_tokens": out_tokens,
        "throughput_tokens_s": per_s(out_tokens), "throughput_requests_s": per_s(len(done)),
        "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo},
        "attainment_ttft": _frac(sum(r.meets(ttft_slo, None) for r in results), n),
        "attainment_tpot": _frac(sum(r.meets(None, tpot_slo) for r in results), n),
        "attainment": _frac(met, n),
        "goodput_requests_s": per_s(met),
        "errors": _top_errors(results),
    }


def _frac(k: int, n: int) -> float | None:
    return k / n if n else None


def _top_errors(results: list[RequestResult], limit: int = 5) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        if r.error:
            counts[r.error[:200]] = counts.get(r.error[:200], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])
