"""loadgen/goodput.py: SLO scale, probe sizing, the early-stop rule and the search, on made-up results."""
from __future__ import annotations

import pytest

from loadgen.goodput import (Bracket, Probe, SearchConfig, Slo, allowed_misses, bracket, clearly_lost, decided,
                             goodput, known_miss, next_probe, pick_reference, probe_duration_s, probe_requests,
                             round_rate, slo_levels, start_rate, unloaded_latency, verdicts)
from loadgen.metrics import RequestResult


def _req(index=0, scheduled=0.0, first=None, gap=0.01, tokens=0, max_tokens=10, end=None, error=None):
    """A result whose first token came at `first` (absolute), then one token every `gap`."""
    r = RequestResult(index, scheduled, sent_s=scheduled, max_tokens=max_tokens, error=error)
    if first is not None:
        r.events = [(first + i * gap, 1) for i in range(tokens)]
    r.end_s = end
    return r


# ------------------------------------------------------------------------------------ SLO scale

def test_slo_levels_are_three_and_ten_times_the_unloaded_latencies():
    levels = slo_levels(0.05, 0.008)
    assert levels["tight"] == Slo(pytest.approx(0.15), pytest.approx(0.024))
    assert levels["relaxed"] == Slo(pytest.approx(0.5), pytest.approx(0.08))
    assert slo_levels(1.0, 2.0, {"x": 1.5}) == {"x": Slo(1.5, 3.0)}
    with pytest.raises(ValueError, match="must be > 0"):
        slo_levels(0.0, 0.01)


def test_unloaded_latency_is_the_median_ttft_and_median_mean_inter_token_time():
    results = [_req(i, 0.0, first=t, gap=g, tokens=5, max_tokens=5, end=t + 4 * g)
               for i, (t, g) in enumerate([(0.1, 0.01), (0.3, 0.03), (0.2, 0.02)])]
    results.append(_req(3, 0.0, first=0.05, tokens=1, max_tokens=5, end=0.1, error="boom"))   # failed: ignored
    ttft, tpot = unloaded_latency(results)
    assert ttft == pytest.approx(0.2) and tpot == pytest.approx(0.02)
    with pytest.raises(ValueError, match="no unloaded request"):
        unloaded_latency([_req(0, 0.0, first=0.1, tokens=1, max_tokens=1, end=0.1)])


def test_reference_is_the_fastest_request_end_to_end():
    # b: slower first token but much faster decode over 64 tokens
    assert pick_reference({"a": (0.05, 0.02), "b": (0.2, 0.005)}, output_tokens=64) == "b"
    assert pick_reference({"a": (0.05, 0.02), "b": (0.2, 0.005)}, output_tokens=2) == "a"
    with pytest.raises(ValueError):
        pick_reference({}, 64)


def test_start_rate_is_one_request_at_a_time_clamped_and_rounded():
    assert start_rate(0.2, 0.01, 101, min_rate=0.1, max_rate=64) == pytest.approx(0.833)    # 1 / 1.2 s
    assert start_rate(10.0, 1.0, 128, min_rate=0.1, max_rate=64) == 0.1
    assert start_rate(0.0, 0.0, 128, min_rate=0.1, max_rate=64) == 64
    assert start_rate(0.2, 0.01, 101, min_rate=0.1, max_rate=64, concurrency=4) == pytest.approx(3.33)
    assert round_rate(5.656854) == 5.66 and round_rate(12.345) == 12.3


# ---------------------------------------------------------------------------------- probe sizing

def test_probe_requests_last_about_the_asked_duration_within_bounds():
    assert probe_requests(2.0, duration_s=60) == 120
    assert probe_requests(0.7, duration_s=60) == 42                 # ceil(42.0)
    assert probe_requests(0.05, duration_s=60, min_requests=20) == 20
    assert probe_requests(100.0, duration_s=60, max_requests=1000) == 1000
    assert probe_duration_s(120, 2.0) == pytest.approx(59.5)
    assert probe_duration_s(1, 2.0) == 0.0
    with pytest.raises(ValueError):
        probe_requests(0.0)
    with pytest.raises(ValueError):
        probe_requests(1.0, min_requests=50, max_requests=10)


# ------------------------------------------------------------------------------------ early stop

def test_allowed_misses():
    assert allowed_misses(20, 0.9) == 2
    assert allowed_misses(16, 0.9) == 1          # 15/16 passes, 14/16 does not
    assert allowed_misses(10, 0.9) == 1
    assert allowed_misses(7, 1.0) == 0


SLO = Slo(ttft_s=1.0, tpot_s=0.1)


def test_known_miss_only_when_no_future_can_meet_the_slo():
    # not yet due, or waiting within the TTFT SLO: not a miss
    assert not known_miss(_req(scheduled=5.0), now=4.0, slo=SLO)
    assert not known_miss(_req(scheduled=0.0), now=0.9, slo=SLO)
    # no first token past the TTFT SLO
    assert known_miss(_req(scheduled=0.0), now=1.1, slo=SLO)
    # first token late
    assert known_miss(_req(scheduled=0.0, first=1.5, tokens=1), now=1.6, slo=SLO)
    # in flight, 3 of 10 tokens: even a 10th token now gives TPOT (now - first) / 9
    r = _req(scheduled=0.0, first=0.5, gap=0.05, tokens=3, max_tokens=10)
    assert not known_miss(r, now=0.5 + 0.9, slo=SLO)               # 0.1 s per token: still possible
    assert known_miss(r, now=0.5 + 0.91, slo=SLO)
    # ended: its own verdict
    assert known_miss(_req(scheduled=0.0, first=0.5, gap=0.2, tokens=10, end=2.4), now=9.0, slo=SLO)
    assert not known_miss(_req(scheduled=0.0, first=0.5, gap=0.05, tokens=10, end=1.0), now=9.0, slo=SLO)
    assert known_miss(_req(scheduled=0.0, first=0.5, tokens=2, end=0.6, error="reset"), now=9.0, slo=SLO)


def test_clearly_lost_once_misses_exceed_what_attainment_allows():
    # 10 requests, 90%: one miss allowed
    results = [_req(i, scheduled=float(i)) for i in range(10)]
    for r in results[:2]:
        r.events, r.end_s = [(0.2 + r.scheduled_s, 1)], r.scheduled_s + 0.2        # met
    assert not clearly_lost(results, now=3.05, slo=SLO, attainment=0.9)   # request 2 is waiting, 0.05 s
    assert not clearly_lost(results, now=3.5, slo=SLO, attainment=0.9)    # request 2 missed TTFT: 1 miss
    memo: dict = {}
    assert clearly_lost(results, now=4.5, slo=SLO, attainment=0.9, ended=memo)    # requests 2 and 3
    # the memo only holds ended requests, judged once
    assert set(memo) == {0, 1} and not any(memo.values())


def test_decided_only_when_everything_sent_and_every_unfinished_request_is_a_known_miss():
    tight, relaxed = Slo(0.1, 0.01), Slo(1.0, 0.1)
    done = _req(0, 0.0, first=0.05, gap=0.01, tokens=10, end=0.14)
    stuck = _req(1, 0.5)                                     # never answered
    assert not decided([done, stuck], now=0.55, slos=[tight, relaxed])    # relaxed TTFT still possible
    assert decided([done, stuck], now=1.6, slos=[tight, relaxed])
    assert not decided([done, _req(2, 5.0)], now=1.6, slos=[tight])      # one not yet due


def test_verdicts_of_a_stopped_probe_decide_only_what_was_lost():
    att = {"tight": 0.5, "relaxed": 0.95}
    assert verdicts(att, 0.9, stopped=False, lost={}) == {"tight": False, "relaxed": True}
    assert verdicts({"tight": None, "relaxed": 0.9}, 0.9, stopped=False, lost={}) == {"tight": False, "relaxed": True}
    assert verdicts(att, 0.9, stopped=True, lost={"tight": True, "relaxed": False}) == {"tight": False, "relaxed": None}


# ----------------------------------------------------------------------------------------- search

def _outcome(rate, tight_cap, relaxed_cap):
    return Probe(rate, {"tight": rate <= tight_cap, "relaxed": rate <= relaxed_cap})


def _search(cfg, tight_cap, relaxed_cap, limit=30):
    """Run next_probe against a system that passes each level up to a capacity; the probe sequence."""
    probes = []
    for _ in range(limit):
        step = next_probe(probes, cfg)
        if step is None:
            return probes
        assert step.needs, "a probe that decides nothing"
        probes.append(_outcome(step.rate, tight_cap, relaxed_cap))
    raise AssertionError(f"no end after {limit} probes: {[p.rate for p in probes]}")


def test_bracket_ignores_a_noisy_pass_above_the_lowest_failure():
    probes = [Probe(1.0, {"x": True}), Probe(2.0, {"x": False}), Probe(4.0, {"x": True}), Probe(1.5, {"x": None})]
    assert bracket(probes, "x") == Bracket(1.0, 2.0)
    assert bracket([], "x") == Bracket(None, None)


def test_search_ascends_then_descends_then_bisects_both_levels_from_one_series():
    cfg = SearchConfig(start=1.0, resolution=1.25, min_rate=0.1, max_rate=64)
    probes = _search(cfg, tight_cap=0.6, relaxed_cap=5.0)
    rates = [p.rate for p in probes]
    assert rates[:5] == [1.0, 2.0, 4.0, 8.0, 0.5]     # up x2 until relaxed fails, then down for tight
    assert len(rates) == len(set(rates))
    for level, cap in (("tight", 0.6), ("relaxed", 5.0)):
        g = goodput(probes, level, cfg)
        assert g.complete and g.lo <= cap < g.hi and g.hi / g.lo <= 1.25
        assert g.goodput == g.lo
    assert len(probes) <= 11


def test_search_starting_above_both_capacities_descends():
    cfg = SearchConfig(start=10.0)
    probes = _search(cfg, tight_cap=1.0, relaxed_cap=3.0)
    assert [p.rate for p in probes][:3] == [10.0, 5.0, 2.5]
    assert goodput(probes, "relaxed", cfg).lo <= 3.0 < goodput(probes, "relaxed", cfg).hi


def test_search_gives_zero_when_even_the_minimum_rate_fails():
    cfg = SearchConfig(start=0.4, min_rate=0.1)
    probes = _search(cfg, tight_cap=0.0, relaxed_cap=1.0)
    assert min(p.rate for p in probes) == 0.1
    g = goodput(probes, "tight", cfg)
    assert g == g.__class__(0.0, None, 0.1, True)


def test_search_stops_at_the_maximum_rate_with_a_lower_bound():
    cfg = SearchConfig(start=20.0, max_rate=64)
    probes = _search(cfg, tight_cap=100.0, relaxed_cap=100.0)
    assert [p.rate for p in probes] == [20.0, 40.0, 64.0]
    g = goodput(probes, "relaxed", cfg)
    assert (g.goodput, g.hi, g.complete) == (64.0, None, True)


def test_next_probe_only_asks_levels_whose_bracket_holds_the_rate():
    cfg = SearchConfig(start=1.0)
    probes = [Probe(1.0, {"relaxed": True, "tight": False}), Probe(2.0, {"relaxed": False, "tight": False})]
    step = next_probe(probes, cfg)
    assert step.rate == 0.5 and step.needs == {"tight"}      # relaxed already passed at 1.0
    # a stopped probe that left relaxed undecided does not block the search
    probes.append(Probe(0.5, {"relaxed": None, "tight": True}))
    step = next_probe(probes, cfg)
    assert step.rate == 0.75 and step.needs == {"tight"}      # both brackets 2x wide: the lower rate first
    probes.append(Probe(0.75, {"relaxed": None, "tight": True}))
    step = next_probe(probes, cfg)
    assert step.rate == 1.5 and step.needs == {"relaxed"}     # relaxed (1, 2) is now the widest bracket


def test_seeds_come_first_each_while_its_own_level_is_open():
    # the reference's bracket ends: tight [2.0, 2.5], relaxed [4.0, 5.0]
    seeds = ((2.0, "tight"), (2.5, "tight"), (4.0, "relaxed"), (5.0, "relaxed"))
    cfg = SearchConfig(start=0.7, seeds=seeds)
    probes = _search(cfg, tight_cap=2.2, relaxed_cap=4.5)
    assert [p.rate for p in probes] == [2.0, 2.5, 4.0, 5.0]       # the same brackets, from four probes
    assert (goodput(probes, "tight", cfg).lo, goodput(probes, "relaxed", cfg).lo) == (2.0, 4.0)
    # a slower system: 2.0 fails tight, so tight descends to a pass before any other seed, tight's
    # 2.5 is skipped and relaxed's own seeds come next; the start rate is never used
    probes = _search(cfg, tight_cap=1.0, relaxed_cap=3.0)
    rates = [p.rate for p in probes]
    assert rates[:3] == [2.0, 1.0, 4.0] and 2.5 not in rates[:3] and 0.7 not in rates
    assert next_probe([], cfg).needs == {"tight", "relaxed"}
    for level, cap in (("tight", 1.0), ("relaxed", 3.0)):
        g = goodput(probes, level, cfg)
        assert g.complete and g.lo <= cap < g.hi
    # a seed without a level is probed while any level's bracket holds it
    cfg = SearchConfig(start=0.7, seeds=((2.0, None), (2.5, None)))
    assert [p.rate for p in _search(cfg, tight_cap=3.0, relaxed_cap=5.0)][:2] == [2.0, 2.5]
