"""router/request/output_predictor.py: learns planted relations online; quantiles; live error; warm start."""
from __future__ import annotations

import json

import numpy as np
import pytest

from router.request.output_predictor import OutputPredictor, PredictionError, Quantiles

APPS = {0: 12, 1: 40, 2: 90, 3: 200}         # application → mean output tokens
MAX_TOKENS = 256


def workload(seed: int, n: int, shift: bool = False):
    """(prompt, output tokens, app) with a 48-token system prompt per app, then a random user part.
    shift: a random 1-7 token preamble first, so no block-aligned prefix is shared (only n-grams are)."""
    rng = np.random.default_rng(seed)
    systems = {a: list(np.random.default_rng(100 + a).integers(3, 30000, 48)) for a in APPS}
    for _ in range(n):
        app = int(rng.integers(len(APPS)))
        pre = list(rng.integers(3, 30000, int(rng.integers(1, 8)))) if shift else []
        prompt = [int(t) for t in pre + systems[app] + list(rng.integers(3, 30000, int(rng.integers(4, 24))))]
        out = int(np.clip(rng.normal(APPS[app], APPS[app] * 0.1), 1, MAX_TOKENS))
        yield prompt, out, app


def learn_then_measure(p: OutputPredictor, train: int, shift: bool = False):
    for prompt, out, _ in workload(1, train, shift):
        p.observe(prompt, MAX_TOKENS, out)
    err, sources = PredictionError(), set()
    for prompt, out, _ in workload(2, 200, shift):
        q = p.predict(prompt, MAX_TOKENS)
        sources.add(q.source)
        err.add(q, out)
    return err, sources


def test_prior_before_anything_is_learned():
    q = OutputPredictor().predict([5, 6, 7, 8], 100)
    assert q == Quantiles(1.0, 50.0, 100.0, "prior")


@pytest.mark.parametrize("shift", [False, True], ids=["shared-prefix", "similar-only"])
def test_learns_apps_with_distinct_output_lengths_within_40_requests(shift):
    """Planted relation: 4 applications (system prompts) with mean outputs 12/40/90/200 tokens,
    10% noise. After 40 completed requests the median is within 10 tokens on average (the
    global spread is ~70) and orders requests almost perfectly (Spearman > 0.9)."""
    err, sources = learn_then_measure(OutputPredictor(), 40, shift)
    assert err.mae() < 10.0
    assert err.spearman() > 0.9
    assert err.coverage() > 0.6
    assert "similar" in sources


def test_prefix_blocks_alone_carry_the_application():
    """With the similarity search emptied (prompts too short for n-grams in common beyond the
    system prompt would still match), the prefix tables give the same answer."""
    p = OutputPredictor()
    for prompt, out, _ in workload(1, 40):
        p.observe(prompt, MAX_TOKENS, out)
    p._history.clear()
    p._buckets.clear()
    err, sources = PredictionError(), set()
    for prompt, out, _ in workload(2, 100):
        q = p.predict(prompt, MAX_TOKENS)
        sources.add(q.source)
        err.add(q, out)
    assert sources == {"prefix"}
    assert err.mae() < 10.0


def test_quantiles_are_ordered_and_clipped_to_max_tokens():
    p = OutputPredictor()
    for prompt, out, app in workload(1, 60):
        p.observe(prompt, MAX_TOKENS, out)
    for prompt, _, app in workload(3, 20):
        q = p.predict(prompt, 50)
        assert 1 <= q.p10 <= q.p50 <= q.p90 <= 50


def test_hint_is_scaled_by_what_hints_turned_out_to_mean():
    p = OutputPredictor()
    assert p.predict([1, 2, 3], 100, hint=10) == Quantiles(5.0, 10.0, 20.0, "hint")
    for i in range(10):                       # this client's outputs are twice its hints
        p.observe([i, i + 1, i + 2], 100, 2 * (10 + i), hint=10 + i)
    q = p.predict([7, 8, 9], 100, hint=30)
    assert q.source == "hint" and q.p50 == pytest.approx(60.0)


def test_memory_is_bounded(monkeypatch):
    import router.request.output_predictor as op
    monkeypatch.setattr(op, "HISTORY", 50)
    monkeypatch.setattr(op, "MAX_PREFIXES", 20)
    p = OutputPredictor()
    for prompt, out, _ in workload(4, 300):
        p.observe(prompt, MAX_TOKENS, out + 1)
    assert len(p._history) == 50 and len(p._prefix) <= 20
    live = {cid for cid, _, _ in p._history}
    assert set().union(*p._buckets.values()) == live         # no bucket keeps a forgotten prompt
    p.predict(next(workload(5, 1))[0], MAX_TOKENS)


def test_warm_start_and_its_errors(tmp_path):
    rows = [{"prompt_token_ids": prompt, "output_tokens": out, "max_tokens": MAX_TOKENS}
            for prompt, out, _ in workload(1, 40)]
    f = tmp_path / "warm.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    p = OutputPredictor()
    with open(f) as lines:
        assert p.warm_start(lines) == 40
    assert p.predict(rows[0]["prompt_token_ids"], MAX_TOKENS).source in ("similar", "prefix")
    with pytest.raises(ValueError, match=r"warm\.jsonl, line 2: expected .*output_tokens"):
        p.warm_start(['{"prompt_token_ids": [1], "output_tokens": 3}', '{"prompt_token_ids": [1]}'],
                     source="warm.jsonl")


def test_observing_nothing_is_a_no_op():
    p = OutputPredictor()
    p.observe([1, 2, 3, 4], 10, 0)
    assert p.observations == 0


def test_prediction_error_mae_spearman_coverage():
    e = PredictionError(window=4)
    assert (e.mae(), e.spearman(), e.coverage()) == (0.0, 0.0, 0.0)
    for p50, actual in ((10, 12), (20, 18), (30, 35), (40, 41)):
        e.add(Quantiles(p50 - 5, p50, p50 + 5, "prefix"), actual)
    assert e.mae() == pytest.approx((2 + 2 + 5 + 1) / 4)
    assert e.spearman() == pytest.approx(1.0)
    assert e.coverage() == pytest.approx(1.0)
    e.add(Quantiles(1, 50, 60, "prefix"), 1)           # window 4: the first pair drops out
    assert len(e) == 4 and e.spearman() == pytest.approx(-0.2)
    tied = PredictionError()
    for p50, actual in ((5, 1), (5, 2), (5, 3)):
        tied.add(Quantiles(1, p50, 9, "global"), actual)
    assert tied.spearman() == 0.0                       # a constant prediction ranks nothing
