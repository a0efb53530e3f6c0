"""Where a request goes: pure functions over LoadReports plus a ledger of in-flight placements.

Reports are at most one poll old, so a burst of requests arriving between two polls would all
see the same loads and land on the same instance. The router therefore records each placement
in an InflightLedger and every choice here counts those entries on top of the report:

    token = ledger.add(decode.instance_id, blocks=need, running=1)
    ...                                     # the phase runs
    ledger.remove(token)                    # once the instance's own report can reflect it

Until the entry is removed the request may be counted twice (in the ledger and in a fresh
report); that errs towards spreading load, which is the safe side.

Only reports in state "serving" are eligible. Ties go to the smallest instance_id, so the same
inputs always give the same choice.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping

from router.cluster.role_policy import decode_step_s
from router.freeness import freeness as load_freeness
from router.prefill_rate import prefill_rate
from services.roles import Role, WorkerState, pool_role
from tandem.v1 import worker_pb2

LoadReport = worker_pb2.LoadReport


@dataclasses.dataclass(frozen=True)
class InflightLoad:
    """What the router has sent an instance that its last report may not show yet."""
    blocks: int = 0
    prompt_tokens: int = 0
    running: int = 0

    def __add__(self, other: "InflightLoad") -> "InflightLoad":
        return InflightLoad(self.blocks + other.blocks, self.prompt_tokens + other.prompt_tokens,
                            self.running + other.running)

    def __sub__(self, other: "InflightLoad") -> "InflightLoad":
        return InflightLoad(self.blocks - other.blocks, self.prompt_tokens - other.prompt_tokens,
                            self.running - other.running)


_NOTHING = InflightLoad()


class InflightLedger:
    """Placements not yet visible in reports, summed per instance.

    For one asyncio event loop: no method awaits, so none is interleaved with another; it is not
    safe to share between threads.
    """

    def __init__(self):
        self._entries: dict[int, tuple[str, InflightLoad]] = {}
        self._totals: dict[str, InflightLoad] = {}
        self._tokens = itertools.count(1)
        self._held: dict[int, str] = {}           # hold() token → instance
        self._holding: dict[str, int] = {}        # instance → requests this router has live there

    def add(self, instance_id: str, blocks: int = 0, prompt_tokens: int = 0,
            running: int = 0) -> int:
        """Record a placement; returns the token that remove() takes."""
        load = InflightLoad(blocks, prompt_tokens, running)
        token = next(self._tokens)
        self._entries[token] = (instance_id, load)
        self._totals[instance_id] = self._totals.get(instance_id, _NOTHING) + load
        return token

    def remove(self, token: int) -> None:
        """Forget a placement. Removing an unknown or already removed token is a safe no-op, so
        every exit path of a request may call it."""
        entry = self._entries.pop(token, None)
        if entry is None:
            return
        instance_id, load = entry
        total = self._totals[instance_id] - load
        if total == _NOTHING:
            del self._totals[instance_id]
        else:
            self._totals[instance_id] = total

    def hold(self, instance_id: str) -> int:
        """A request of this router now lives on the instance (until let_go): counted by held(),
        which no report can make stale. Returns the token let_go() takes."""
        token = next(self._tokens)
        self._held[token] = instance_id
        self._holding[instance_id] = self._holding.get(instance_id, 0) + 1
        return token

    def let_go(self, token: int) -> None:
        """The request ended (or left). Idempotent, as remove()."""
        instance_id = self._held.pop(token, None)
        if instance_id is not None:
            left = self._holding[instance_id] - 1
            if left:
                self._holding[instance_id] = left
            else:
                del self._holding[instance_id]

    def held(self, instance_id: str) -> int:
        """Requests of this router live on the instance (hold() minus let_go())."""
        return self._holding.get(instance_id, 0)

    def for_instance(self, instance_id: str) -> InflightLoad:
        """Sums of the instance's live entries (all zero when it has none)."""
        return self._totals.get(instance_id, _NOTHING)

    def __len__(self) -> int:
        return len(self._entries)

    def check_integrity(self) -> None:
        """Raises AssertionError unless the per-instance totals equal the sums of the entries."""
        expected: dict[str, InflightLoad] = {}
        for instance_id, load in self._entries.values():
            expected[instance_id] = expected.get(instance_id, _NOTHING) + load
        expected = {i: t for i, t in expected.items() if t != _NOTHING}
        if expected != self._totals:
            raise AssertionError(f"ledger totals {self._totals} != sums of entries {expected}")


def freeness(r: LoadReport, extra_running: int = 0, extra_blocks: int = 0) -> float:
    """Llumnix freeness of a report for placing a new request (router/freeness.py): (free -
    extra_blocks) / max(1, running + waiting + extra_running). Higher is freer; negative once
    reservations exceed free blocks."""
    return load_freeness(r.free_blocks - extra_blocks, r.running + r.waiting + extra_running)


def predicted_ttft_s(r: LoadReport, prompt_tokens: int, inflight: InflightLedger, rate: float = 0.0) -> float:
    """Seconds until this prompt's first token on r: every prompt token ahead of it (queued on
    the instance and in flight to it) plus its own, at `rate` tokens/s when given, else r's
    measured prefill rate (or DEFAULT_PREFILL_TOKENS_PER_S while r reports none)."""
    rate = rate or prefill_rate(r)
    ahead = r.queued_prefill_tokens + inflight.for_instance(r.instance_id).prompt_tokens
    return (ahead + prompt_tokens) / rate


def serves(r: LoadReport, role: int) -> bool:
    """r takes `role`'s work now: it is in that role, or it is a switched instance (adaptive
    pools: COLOCATED now) whose home role is `role`."""
    return r.role == role or (r.role == Role.COLOCATED and r.home_role == role)


def _serving(reports: Iterable[LoadReport], role: int) -> list[LoadReport]:
    return [r for r in reports if serves(r, role) and r.state == WorkerState.SERVING]


def at_seq_cap(r: LoadReport, inflight: InflightLedger) -> bool:
    """The instance holds as many requests as its engine runs in a step (LoadReport.max_num_seqs):
    by its report (running, waiting, reserved) plus this router's placements it does not show yet,
    or by this router's own live requests there (exact for one router, whatever the report's age).
    A new request would only wait in that engine holding KV behind a full batch; it waits in the
    router's queue instead, where the queue bounds see it."""
    cap = getattr(r, "max_num_seqs", 0)
    if not cap:
        return False
    reported = r.running + r.waiting + getattr(r, "leases", 0) + inflight.for_instance(r.instance_id).running
    return max(reported, inflight.held(r.instance_id)) >= cap


def _pick_by_freeness(reports: Iterable[LoadReport], role: int, blocks_needed: int,
                      inflight: InflightLedger, seq_cap: bool = False) -> LoadReport | None:
    best, best_key = None, None
    for r in _serving(reports, role):
        load = inflight.for_instance(r.instance_id)
        if r.free_blocks - load.blocks < blocks_needed or (seq_cap and at_seq_cap(r, inflight)):
            continue
        key = (-freeness(r, load.running, load.blocks), r.instance_id)
        if best_key is None or key < best_key:
            best, best_key = r, key
    return best


def pick_decode(reports: Iterable[LoadReport], blocks_needed: int,
                inflight: InflightLedger) -> LoadReport | None:
    """The serving decode-capable instance (`serves` DECODE) with the highest freeness among those
    with at least blocks_needed free blocks after in-flight reservations and below their engine's
    max_num_seqs (at_seq_cap); None if none has room."""
    return _pick_by_freeness(reports, Role.DECODE, blocks_needed, inflight, seq_cap=True)


def pick_colocated(reports: Iterable[LoadReport], blocks_needed: int,
                   inflight: InflightLedger) -> LoadReport | None:
    """As pick_decode, over serving COLOCATED instances (the baseline pool used when the cluster
    has no prefill/decode pools)."""
    return _pick_by_freeness(reports, Role.COLOCATED, blocks_needed, inflight)


def pick_prefill(reports: Iterable[LoadReport], prompt_tokens: int,
                 inflight: InflightLedger, cached_tokens: Mapping[str, int] | None = None) -> LoadReport | None:
    """The serving prefill-capable instance (`serves` PREFILL) with the least predicted TTFT; None
    if there is none. cached_tokens (prefix routing: instance → prompt tokens its prefix cache
    holds) credits each instance with the tokens it need not compute (credited_ttft_s)."""
    candidates = _serving(reports, Role.PREFILL)
    if cached_tokens is None:
        return min(candidates, default=None, key=lambda r: (predicted_ttft_s(r, prompt_tokens, inflight), r.instance_id))
    return min(candidates, default=None, key=lambda r: (
        credited_ttft_s(r, prompt_tokens, cached_tokens.get(r.instance_id, 0), inflight), r.instance_id))


# How much a cached prompt token counts against queued work when prefix routing compares instances:
# placing a request away from its cache costs the instance that recomputes it the time of those
# tokens, and every request queued behind it waits as long again; 2 counts both.
OVERLAP_WEIGHT = 2.0


def credited_ttft_s(r: LoadReport, prompt_tokens: int, cached_tokens: int, inflight: InflightLedger,
                    overlap_weight: float = OVERLAP_WEIGHT) -> float:
    """predicted_ttft_s over the tokens r does not cache, less (overlap_weight - 1) x the time the
    cached ones save: a score for comparing instances (may be negative), not a TTFT."""
    rate = prefill_rate(r)
    return (predicted_ttft_s(r, max(0, prompt_tokens - cached_tokens), inflight)
            - (overlap_weight - 1.0) * cached_tokens / rate)


def pick_by_prefix(reports: Iterable[LoadReport], role: int, prompt_tokens: int, blocks_needed: int,
                   inflight: InflightLedger, cached_tokens: Mapping[str, int]) -> LoadReport | None:
    """Prefix routing for whole requests (`serves` role: COLOCATED): among instances with room for
    blocks_needed, the least credited_ttft_s (the overlap credit against queued prefill work, both
    in seconds at the instance's measured rate); ties go to the freest, then the smallest
    instance_id. None if none has room.

    Dynamo's cost (prefill blocks + active decode blocks, weight 1) was measured first: a
    conversation's history (tens of blocks) lost to the decode blocks of a busy instance (hundreds)
    and only 107 of 189 later turns stayed where their history was (bench_sched_prefix, load-only:
    80), so both policies served 63% of prompt tokens from cache and P90 TTFT was the same."""
    best, best_key = None, None
    for r in _serving(reports, role):
        load = inflight.for_instance(r.instance_id)
        if r.free_blocks - load.blocks < blocks_needed:
            continue
        key = (credited_ttft_s(r, prompt_tokens, cached_tokens.get(r.instance_id, 0), inflight),
               -freeness(r, load.running, load.blocks), r.instance_id)
        if best_key is None or key < best_key:
            best, best_key = r, key
    return best


def pick_whole_request(reports: Iterable[LoadReport], prompt_tokens: int, blocks_needed: int,
                       inflight: InflightLedger) -> LoadReport | None:
    """Adaptive pools: the switched instance (current role COLOCATED, home PREFILL or DECODE) that
    should serve this request whole — prefill and decode — instead of a prefill → decode pair;
    None to disaggregate.

    A switched home-decode instance takes it when its predicted TTFT beats every prefill
    instance's (it has the KV room; its prefill rate is what its step cap lets through). A switched
    home-prefill instance takes it when its decodes are lighter than every decode instance's
    (fewer running requests), so decode load moves to it. Ties disaggregate.
    """
    reports = [r for r in reports if r.state == WorkerState.SERVING]
    switched = [r for r in reports if r.role == Role.COLOCATED
                and r.home_role in (Role.PREFILL, Role.DECODE)
                and r.free_blocks - inflight.for_instance(r.instance_id).blocks >= blocks_needed]
    if not switched:
        return None
    prefills = [r for r in reports if pool_role(r) == Role.PREFILL]     # in both roles too
    decodes = [r for r in reports if pool_role(r) == Role.DECODE]     # in both roles too (a standing share)
    best_p = min((predicted_ttft_s(r, prompt_tokens, inflight) for r in prefills), default=float("inf"))
    best_d = min((r.running + inflight.for_instance(r.instance_id).running for r in decodes), default=None)
    chosen, chosen_key = None, None
    for r in switched:
        if r.home_role == Role.DECODE:
            ttft = predicted_ttft_s(r, prompt_tokens, inflight, rate=mixed_prefill_rate(r))
            if ttft >= best_p:
                continue
            key = (ttft, r.instance_id)
        else:
            running = r.running + inflight.for_instance(r.instance_id).running
            if best_d is not None and running >= best_d:
                continue
            key = (predicted_ttft_s(r, prompt_tokens, inflight), r.instance_id)
        if chosen_key is None or key < chosen_key:
            chosen, chosen_key = r, key
    return chosen


def mixed_prefill_rate(r: LoadReport) -> float:
    """Prompt tokens per second an instance that caps prefill beside decodes gets through: its
    measured rate, or while it has decodes running one cap per step, a step being its decode step
    (role_policy.decode_step_s) plus the cap's tokens at the measured rate."""
    rate = prefill_rate(r)
    step_s = decode_step_s(r)
    if r.mixed_prefill_tokens and step_s > 0:
        cap = r.mixed_prefill_tokens
        rate = min(rate, cap / (step_s + cap / rate))
    return rate
