"""Goodput search as pure functions: SLO scale, probe sizing, the early-stop rule, the next rate.

DistServe's "SLO scale": each SLO is a multiple of the host's own unloaded latencies, so a figure
carries over between hosts of different speed. `slo_levels(ttft_s, tpot_s)` gives the tight (3x)
and relaxed (10x) pairs. Goodput at a level is the highest offered rate at which at least the
target share of requests (0.9) meets both of its SLOs.

One series of probes serves every level: each probe's per-request results are judged under each
level's SLOs. A request that meets the tight SLOs meets the relaxed ones, so relaxed attainment is
never below tight attainment at the same rate. `next_probe` ascends (x2) until the relaxed level
fails, descends (/2) until the tight level passes, then bisects whichever bracket is widest.
`SearchConfig.seeds` are probed first: the reference system's bracket ends, so every system is
measured at the very rates the reference passed and failed and the ratios compare like with like.

A probe may stop early once its verdict is certain for every level that still needs it: more
requests are already known misses than the target share allows (`clearly_lost`). Known misses
assume every request runs to its max_tokens (the targets send ignore_eos).

Nothing here sleeps, reads a clock or touches a target: the driver passes `now` and the results.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from loadgen.metrics import RequestResult

LEVELS = ("tight", "relaxed")
SCALES = {"tight": 3.0, "relaxed": 10.0}


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


# ------------------------------------------------------------------------------------ SLO scale

def unloaded_latency(results: Iterable[RequestResult]) -> tuple[float, float]:
    """(median TTFT, median TPOT) over completed requests sent one at a time.

    Each request's TPOT is its mean inter-token time, so the median TPOT is "TPOT at batch 1".
    Raises ValueError when no request completed with at least two tokens.
    """
    done = [r for r in results if r.ok and r.tpot_s is not None]
    if not done:
        raise ValueError("no unloaded request completed with two or more tokens")
    return statistics.median(r.ttft_s for r in done), statistics.median(r.tpot_s for r in done)


def slo_levels(ttft_s: float, tpot_s: float, scales: Mapping[str, float] = SCALES) -> dict[str, Slo]:
    """Each level's SLOs: its scale times the unloaded TTFT and TPOT. ValueError unless both are > 0."""
    if not (ttft_s > 0 and tpot_s > 0):
        raise ValueError(f"unloaded latencies must be > 0 s, got TTFT {ttft_s} and TPOT {tpot_s}")
    return {level: Slo(ttft_s * k, tpot_s * k) for level, k in scales.items()}


def pick_reference(unloaded: Mapping[str, tuple[float, float]], output_tokens: int) -> str:
    """The fastest system: the smallest unloaded TTFT + (output_tokens - 1) x TPOT (ties: first)."""
    if not unloaded:
        raise ValueError("no system measured")
    return min(unloaded, key=lambda s: unloaded[s][0] + (output_tokens - 1) * unloaded[s][1])


def start_rate(ttft_s: float, tpot_s: float, mean_output_tokens: float, min_rate: float, max_rate: float,
               concurrency: float = 1.0) -> float:
    """The first probe's rate: what a system serving `concurrency` requests at a time at their unloaded
    latency would sustain (Little's law), clamped. A batching server sustains several at once, and
    starting high is cheap: a failing probe stops within seconds, a passing one runs its full length."""
    e2e = ttft_s + max(mean_output_tokens - 1, 0) * tpot_s
    return round_rate(min(max(concurrency / e2e if e2e > 0 else max_rate, min_rate), max_rate))


def round_rate(rate: float) -> float:
    """Three significant digits: rates stay readable in reports and file names."""
    return float(f"{rate:.3g}")


# ---------------------------------------------------------------------------------- probe sizing

def probe_requests(rate: float, duration_s: float = 60.0, min_requests: int = 20,
                   max_requests: int = 1000) -> int:
    """Requests in a probe at `rate` so its arrivals span about `duration_s` seconds.

    Never fewer than `min_requests` (below that one miss moves attainment by more than 5%) nor
    more than `max_requests` (the trace slice); a low rate therefore gives a longer probe.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if not 0 < min_requests <= max_requests:
        raise ValueError(f"need 0 < min_requests <= max_requests, got {min_requests}, {max_requests}")
    return min(max(math.ceil(rate * duration_s), min_requests), max_requests)


def probe_duration_s(n: int, rate: float) -> float:
    """How long a probe of `n` requests at `rate` takes to send them (trace arrivals rescaled to `rate`)."""
    return (n - 1) / rate if n > 1 else 0.0


# ------------------------------------------------------------------------------------ early stop

def allowed_misses(n: int, attainment: float) -> int:
    """The most misses among `n` requests that still leave attainment >= `attainment`."""
    return n - math.ceil(n * attainment - 1e-9)


def known_miss(r: RequestResult, now: float, slo: Slo) -> bool:
    """True when `r` cannot meet `slo` however it ends: it ended missing, its first token is later
    than the TTFT SLO (or still absent past it), or even a last token right now would give a TPOT
    above the SLO (assumes the request runs to max_tokens)."""
    if r.end_s is not None:
        return not r.meets(slo.ttft_s, slo.tpot_s)
    if not r.events:
        return now - r.scheduled_s > slo.ttft_s
    if r.ttft_s > slo.ttft_s:
        return True
    if r.output_tokens < r.max_tokens and r.max_tokens > 1:
        return (now - r.events[0][0]) / (r.max_tokens - 1) > slo.tpot_s
    return False


def clearly_lost(results: Sequence[RequestResult], now: float, slo: Slo, attainment: float,
                 ended: dict[int, bool] | None = None) -> bool:
    """More requests are known misses than `attainment` allows: the probe fails whatever comes next.

    `results` are in schedule order. `ended`, when given, memoises the verdict of each request that
    has ended (by index), so a check during a long probe only re-examines requests in flight.
    """
    limit = allowed_misses(len(results), attainment)
    misses = 0
    for r in results:
        if r.scheduled_s > now:
            break
        if r.end_s is not None and ended is not None:
            miss = ended.get(r.index)
            if miss is None:
                miss = ended[r.index] = known_miss(r, now, slo)
        else:
            miss = known_miss(r, now, slo)
        misses += miss
        if misses > limit:
            return True
    return False


def decided(results: Sequence[RequestResult], now: float, slos: Iterable[Slo]) -> bool:
    """Every request has been sent and each one still unfinished is a known miss at every level:
    waiting longer cannot change any verdict (stopping now loses nothing)."""
    if results and results[-1].scheduled_s > now:
        return False
    return all(known_miss(r, now, slo) for r in results if r.end_s is None for slo in slos)


# --------------------------------------------------------------------------------------- search

@dataclass(frozen=True)
class Probe:
    """One probe's verdicts: level → True (passed), False (failed), None (stopped before it was certain)."""
    rate: float
    passed: Mapping[str, bool | None]


@dataclass(frozen=True)
class SearchConfig:
    start: float
    factor: float = 2.0             # ascent / descent step
    resolution: float = 1.25        # a level is done once its bracket's hi / lo is at most this
    min_rate: float = 0.1           # failing here: goodput 0 (below min_rate)
    max_rate: float = 64.0          # passing here: goodput >= max_rate
    # probed first, in order: (rate, level) while that level's bracket holds the rate (level None: any level's)
    seeds: tuple[tuple[float, str | None], ...] = ()


@dataclass(frozen=True)
class Bracket:
    lo: float | None                # highest passing rate below `hi` (None: none passed)
    hi: float | None                # lowest failing rate (None: none failed)

    def contains(self, rate: float) -> bool:
        return (self.lo is None or rate > self.lo) and (self.hi is None or rate < self.hi)


def bracket(probes: Iterable[Probe], level: str) -> Bracket:
    """The level's bracket; a pass above the lowest failing rate (noise) is not believed."""
    probes = list(probes)
    hi = min((p.rate for p in probes if p.passed.get(level) is False), default=None)
    lo = max((p.rate for p in probes if p.passed.get(level) is True and (hi is None or p.rate < hi)), default=None)
    return Bracket(lo, hi)


def level_done(b: Bracket, cfg: SearchConfig) -> bool:
    if b.lo is None and b.hi is None:
        return False
    if b.hi is None:
        return b.lo >= cfg.max_rate
    if b.lo is None:
        return b.hi <= cfg.min_rate
    return b.hi / b.lo <= cfg.resolution


@dataclass(frozen=True)
class Step:
    rate: float
    needs: frozenset[str] = field(default_factory=frozenset)   # levels whose verdict this probe decides


def next_probe(probes: Sequence[Probe], cfg: SearchConfig, levels: Sequence[str] = ("relaxed", "tight")) -> Step | None:
    """The next rate to probe and the levels it decides, or None when every level is done.

    Order: first the seeds, each while its level's bracket holds it (it then decides every level
    whose bracket holds it), but a level that has failed and never passed first descends (/ factor)
    until it passes, so a short budget never leaves it without a lower bound; then bracket every
    level (ascend x factor from the highest passing rate while it has not failed, descend / factor from the lowest failing rate while it has not passed, never below
    min_rate nor above max_rate), relaxed before tight; then bisect the widest bracket. A rate
    already probed, or one rounding onto a bracket's end, ends that level.
    """
    probed = {p.rate for p in probes}
    brackets = {lv: bracket(probes, lv) for lv in levels}
    open_levels = [lv for lv in levels if not level_done(brackets[lv], cfg)]
    stuck = [lv for lv in open_levels if brackets[lv].lo is None and brackets[lv].hi is not None]
    if cfg.seeds and stuck:     # a level that failed a seed and never passed descends before more seeds
        rate = max(round_rate(brackets[stuck[0]].hi / cfg.factor), cfg.min_rate)
        if rate not in probed:
            return Step(rate, frozenset(lv for lv in open_levels if brackets[lv].contains(rate)))
    for seed, seed_level in cfg.seeds:
        rate = min(max(round_rate(seed), cfg.min_rate), cfg.max_rate)
        needs = frozenset(lv for lv in open_levels if brackets[lv].contains(rate))
        if rate not in probed and (needs if seed_level is None else seed_level in needs):
            return Step(rate, needs)
    if not probes:
        return Step(cfg.start, frozenset(levels))
    moves: list[tuple[int, float, float]] = []            # (priority, -width, rate)
    for i, lv in enumerate(open_levels):
        b = brackets[lv]
        if b.hi is None or b.lo is None:
            if b.hi is None:
                rate = min(round_rate((b.lo if b.lo is not None else max(probed)) * cfg.factor), cfg.max_rate)
            else:
                rate = max(round_rate(b.hi / cfg.factor), cfg.min_rate)
            moves.append((0, float(i), rate))
        else:
            moves.append((1, -(b.hi / b.lo), round_rate((b.lo + b.hi) / 2)))
    for _, _, rate in sorted(moves):
        if rate in probed:
            continue
        needs = frozenset(lv for lv in open_levels if brackets[lv].contains(rate))
        if needs:
            return Step(rate, needs)
    return None


@dataclass(frozen=True)
class Goodput:
    """A level's result: `goodput` (req/s; 0.0 when even the lowest probed rate failed), its bracket,
    and whether the search finished (False: stopped by the time budget; `goodput` is then a lower
    bound at best)."""
    goodput: float
    lo: float | None
    hi: float | None
    complete: bool


def goodput(probes: Sequence[Probe], level: str, cfg: SearchConfig) -> Goodput:
    b = bracket(probes, level)
    return Goodput(b.lo or 0.0, b.lo, b.hi, level_done(b, cfg))


def verdicts(attainments: Mapping[str, float | None], attainment: float, stopped: bool,
             lost: Mapping[str, bool]) -> dict[str, bool | None]:
    """Each level's verdict for one probe.

    A probe that ran to its end passes a level when its attainment reaches `attainment`. A probe
    stopped early fails the levels that were `lost` when it stopped and leaves the others undecided
    (None): their unfinished requests might still have met the SLOs.
    """
    if stopped:
        return {lv: (False if lost.get(lv) else None) for lv in attainments}
    return {lv: (a or 0.0) >= attainment for lv, a in attainments.items()}
