"""Rescheduler policy: which decode instance should move a request to which, and why.

Pure functions over load records (no I/O, no clock, no randomness): a load is a decode instance's
tandem.v1.LoadReport (services/load.py), or anything with its field names (the simulator's
instances). The rescheduler loop in the router reads fresh reports every 50–100 ms, calls
`decide`, and asks each decision's source to `Migrate` one request chosen by the decision's
selector. Follows Llumnix (OSDI'24).

Load
----
- used(i)            = total_blocks − free_blocks
- headroom_need(i)   = high_priority_running × config.high_priority_headroom_blocks
- virtual_usage(i)   = used + head_waiting_blocks + headroom_need + pending   (pending: see defrag)
- freeness F(i)      = (total_blocks − virtual_usage) / max(running, 1); lower is more loaded.
  A draining instance has F = −inf. F may be negative when the virtual usage exceeds the total.

Moving one request (the estimate every rule below uses)
------------------------------------------------------
- moved(i) = ceil(used / running) blocks, the source's average request; for the priority
  policy the average normal request,
  ceil((used − high_priority_blocks) / (running − high_priority_running));
  on a source with nothing running (drain of waiting requests) head_waiting_blocks.
- After the move: F_src' = (total − (virtual_usage − moved)) / max(running − 1, 1) on the
  source and F_dst' = (total − (virtual_usage + moved)) / (running + 1) on the destination.
  The estimate assumes the moved request has normal priority, so the headroom terms do not
  change; the source's real pick may differ, and the next round sees the real loads.

Eligibility (every policy)
--------------------------
- An instance appears in at most one decision per round, as source or as destination, and only
  while its migrations in flight < max_migrations_per_instance (the in-flight count includes both
  directions: the report's migrations_in_flight, or the caller's `in_flight` count when higher). At most max_decisions_per_round decisions are returned.
- A destination is in state "serving", is not the source, and has room: after taking `moved`
  blocks it keeps its watermark free beyond its virtual usage,
      total − virtual_usage(dst) − moved ≥ watermark(dst),
  so it keeps its high-priority headroom and its head-of-line waiting demand free too. The
  watermark is free_watermark_blocks, or ceil(fraction × total_blocks) when it is below 1.
- Among acceptable destinations the one with the highest F is taken (ties: smallest id).
- Except for drain, a move needs F_dst > F_src and F_dst' ≥ F_src: the destination is less
  loaded than the source and does not end more loaded than the source was.

Policies, applied in the order of config.policies (default: drain, defrag, priority, balance);
an instance claimed by an earlier policy is not available to a later one.
- drain: every "draining" instance with running + waiting > 0 is a source, in instance_id
  order, regardless of gaps (F = −inf). Reason "drain", selector config.selector. One request
  per round; the loop keeps draining it over later rounds until it reports nothing left.
- defrag: pending_demand_blocks > 0 means a queued request needs that many blocks. If some
  serving instance already has that many free blocks, nothing to do. Otherwise the serving
  instance with the most free blocks among those whose total can hold the demand (ties:
  smallest id) is the target: the demand is added to its virtual usage (for this round, in every
  policy, so balance will not refill it) and one of its requests moves elsewhere. Reason
  "defrag", selector config.selector. Without "defrag" in config.policies the demand is
  ignored.
- priority: a serving instance with high_priority_running > 0, free_blocks < headroom_need and
  at least one normal request running moves a normal request away, most loaded instance first.
  Reason "priority", selector "lowest_priority".
- balance: serving sources with running > 0, most loaded first (ties: smallest id), each paired
  greedily with the least loaded acceptable destination. A move needs F_dst − F_src >
  gap_threshold and |F_dst' − F_src'| < |F_dst − F_src| (the gap shrinks). Reason "balance",
  selector config.selector.

Instances in state "starting", "stopping" or "drained" take part in nothing. The result
depends only on the set of loads, not their order: ties are broken by instance_id.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from router.freeness import freeness as load_freeness
from services.load import used_blocks
from services.roles import Role, WorkerState, pool_role

POLICIES = ("drain", "defrag", "priority", "balance")
Load = Any      # a tandem.v1.LoadReport or an object with its fields (module docstring)
SELECTORS = ("shortest", "longest", "lowest_priority")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Rescheduler knobs. Raises ValueError on an unknown policy or selector, a repeated
    policy, or a negative or zero limit."""
    policies: tuple[str, ...] = POLICIES            # in this order of precedence
    gap_threshold: float = 8.0                      # min freeness gap (dst − src), blocks/request
    high_priority_headroom_blocks: int = 16         # virtual usage per high-priority request
    free_watermark_blocks: int | float = 0.05       # kept free on a destination; < 1: of total
    max_migrations_per_instance: int = 1            # in flight, in + out
    max_decisions_per_round: int = 4
    selector: str = "shortest"                      # which request a source moves

    def __post_init__(self):
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {list(POLICIES)}")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies repeat one: {list(self.policies)}")
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}; choose from {list(SELECTORS)}")
        if self.gap_threshold < 0 or self.high_priority_headroom_blocks < 0:
            raise ValueError("gap_threshold and high_priority_headroom_blocks must be ≥ 0")
        if self.free_watermark_blocks < 0:
            raise ValueError("free_watermark_blocks must be ≥ 0")
        if self.max_migrations_per_instance < 1 or self.max_decisions_per_round < 1:
            raise ValueError(
                "max_migrations_per_instance and max_decisions_per_round must be ≥ 1")


@dataclasses.dataclass(frozen=True)
class MigrationDecision:
    source: str
    destination: str
    reason: str          # "drain" | "defrag" | "priority" | "balance"
    selector: str        # what the source should pick: shortest | longest | lowest_priority
    request_id: str = ""  # empty: the source picks with `selector`


def virtual_usage(load: Load, config: PolicyConfig,
                  pending_demand_blocks: int = 0) -> float:
    """Blocks used, plus head-of-line waiting demand, plus high-priority headroom, plus
    pending_demand_blocks (the defrag target's queued request)."""
    return (used_blocks(load) + load.head_waiting_blocks + pending_demand_blocks
            + load.high_priority_running * config.high_priority_headroom_blocks)


def freeness(load: Load, config: PolicyConfig, pending_demand_blocks: int = 0) -> float:
    """(total − virtual usage) / max(running, 1) (router/freeness.py); −inf for a draining instance."""
    if load.state == WorkerState.DRAINING:
        return -math.inf
    return load_freeness(load.total_blocks - virtual_usage(load, config, pending_demand_blocks), load.running)


# The pools whose instances decode, so exchange running requests: decode ↔ decode and colocated ↔
# colocated, never across (a request decoding on a colocated instance was never handed off).
MIGRATING_ROLES = (Role.DECODE, Role.COLOCATED)


def migration_groups(loads: Iterable[Load]) -> list[list[Load]]:
    """`loads` split into the groups decide() runs on: one per pool of MIGRATING_ROLES, by home role
    (services.roles.pool_role: a decode instance serving both roles for now is still in the decode
    group), each with at least two members, in MIGRATING_ROLES order."""
    loads = list(loads)
    groups = [[x for x in loads if pool_role(x) == role] for role in MIGRATING_ROLES]
    return [g for g in groups if len(g) >= 2]


def decide(loads: Sequence[Load], config: PolicyConfig, pending_demand_blocks: int = 0,
           in_flight: Mapping[str, int] | None = None) -> list[MigrationDecision]:
    """This round's migrations, by the rules in the module docstring; [] when nothing is worth
    moving. in_flight: instance_id → migrations the caller launched that a report may not show
    yet (the larger of it and the report's count holds). Raises ValueError if two loads share an
    instance_id."""
    rnd = _Round(loads, config, pending_demand_blocks, in_flight or {})
    for policy in config.policies:
        _POLICY_STEPS[policy](rnd)
    return rnd.decisions


class _Round:
    """One call of decide: the loads, which instances are claimed, the decisions so far."""

    def __init__(self, loads: Sequence[Load], config: PolicyConfig, pending: int, in_flight: Mapping[str, int]):
        self.config = config
        self.in_flight = in_flight
        self.loads = sorted(loads, key=lambda load: load.instance_id)
        ids = [load.instance_id for load in self.loads]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate instance ids in {ids}")
        self.pending: dict[str, int] = {}
        target = _defrag_target(self.loads, pending) if "defrag" in config.policies else None
        if target is not None:
            self.pending[target.instance_id] = pending
        self.claimed: set[str] = set()
        self.decisions: list[MigrationDecision] = []
        # A load's usage and freeness do not change within a round (its report and `pending` are
        # fixed): computed once each, and the serving loads ordered by freeness once, so that a
        # round over n instances costs O(n) per source instead of n freeness evaluations and a sort.
        self._usage: dict[str, float] = {}
        self._freeness: dict[str, float] = {}
        self._shapes: list[tuple[float, tuple[int, float, int], list[Load]]] | None = None

    def full(self) -> bool:
        return len(self.decisions) >= self.config.max_decisions_per_round

    def available(self, load: Load) -> bool:
        return load.instance_id not in self.claimed and self._has_slot(load)

    def _has_slot(self, load: Load) -> bool:
        in_flight = max(load.migrations_in_flight, self.in_flight.get(load.instance_id, 0))
        return in_flight < self.config.max_migrations_per_instance

    def usage(self, load: Load) -> float:
        u = self._usage.get(load.instance_id)
        if u is None:
            u = self._usage[load.instance_id] = virtual_usage(load, self.config, self.pending.get(load.instance_id, 0))
        return u

    def freeness(self, load: Load) -> float:
        f = self._freeness.get(load.instance_id)
        if f is None:
            f = self._freeness[load.instance_id] = freeness(load, self.config, self.pending.get(load.instance_id, 0))
        return f

    def shapes(self) -> list[tuple[float, tuple[int, float, int], list[Load]]]:
        """The serving loads with a migration slot free (in-flight count below the cap), grouped by
        shape (total blocks, usage, running), which decides a destination's freeness, room and
        after-move freeness: (freeness, shape, members in instance_id order), freest first."""
        if self._shapes is None:
            groups: dict[tuple[int, float, int], list[Load]] = {}
            for d in self.loads:            # instance_id order
                if d.state == WorkerState.SERVING and self._has_slot(d):
                    groups.setdefault((d.total_blocks, self.usage(d), d.running), []).append(d)
            self._shapes = sorted(((self.freeness(m[0]), shape, m) for shape, m in groups.items()),
                                  key=lambda g: (-g[0], g[2][0].instance_id))
        return self._shapes

    def has_room(self, dst: Load, moved: int) -> bool:
        return dst.total_blocks - self.usage(dst) - moved >= _watermark(dst, self.config)

    def after_move(self, load: Load, moved: int, incoming: bool) -> float:
        """The load's freeness once one request of `moved` blocks has left or arrived."""
        delta = 1 if incoming else -1
        return ((load.total_blocks - (self.usage(load) + delta * moved))
                / max(load.running + delta, 1))

    def move_from(self, src: Load, reason: str, selector: str, moved: int,
                  accept: Callable[[float, float, float], bool],
                  beyond: Callable[[float], bool] = lambda f_dst: False) -> None:
        """Pair src with the freest available destination that has room for `moved` blocks
        and for which accept(F_dst, F_dst', F_src') holds; no decision if there is none.
        beyond(F_dst): accept cannot hold for this destination nor any less free one, so the
        (freest-first) search stops there."""
        f_src_after = self.after_move(src, moved, incoming=False)
        # Room and acceptance depend only on a destination's shape (shapes()): each shape is tried
        # once, with its first member not claimed (at scale most instances are alike, e.g. idle).
        tries = []
        for f_dst, shape, members in self.shapes():
            if beyond(f_dst):
                break
            dst = next((m for m in members if m.instance_id not in self.claimed and m.instance_id != src.instance_id),
                       None)
            if dst is not None:
                tries.append((-f_dst, dst.instance_id, dst))
        tries.sort(key=lambda t: t[:2])         # freest first, then instance_id: as one sorted scan would
        for neg_f, _, dst in tries:
            if self.has_room(dst, moved) and accept(-neg_f, self.after_move(dst, moved, incoming=True), f_src_after):
                self.claimed.update((src.instance_id, dst.instance_id))
                self.decisions.append(MigrationDecision(src.instance_id, dst.instance_id,
                                                        reason, selector))
                return

    def move_to_less_loaded(self, src: Load, reason: str, selector: str,
                            moved: int) -> None:
        """move_from with the rule defrag and priority use: F_dst > F_src and F_dst' ≥ F_src.
        Their sources have negative F and the room rule keeps a destination's F' ≥ 0, so this
        holds already; it is checked so that the guarantee does not rest on that argument."""
        f_src = self.freeness(src)
        self.move_from(src, reason, selector, moved,
                       lambda f_dst, f_dst_after, _: f_dst > f_src and f_dst_after >= f_src,
                       beyond=lambda f_dst: not f_dst > f_src)


def _watermark(load: Load, config: PolicyConfig) -> int:
    w = config.free_watermark_blocks
    return math.ceil(w * load.total_blocks) if w < 1 else math.ceil(w)


def _average_request_blocks(load: Load) -> int:
    if load.running == 0:
        return load.head_waiting_blocks
    return math.ceil(used_blocks(load) / load.running)


def _average_normal_request_blocks(load: Load) -> int:
    normal_blocks = max(used_blocks(load) - load.high_priority_blocks, 0)
    return math.ceil(normal_blocks / (load.running - load.high_priority_running))


def _headroom_need(load: Load, config: PolicyConfig) -> int:
    return load.high_priority_running * config.high_priority_headroom_blocks


def _defrag_target(loads: Sequence[Load], demand: int) -> Load | None:
    """The instance to free room on for a queued request of `demand` blocks, or None when
    there is no demand, some serving instance already has room, or none could ever hold it."""
    serving = [load for load in loads if load.state == WorkerState.SERVING]
    if demand <= 0 or any(load.free_blocks >= demand for load in serving):
        return None
    big_enough = [load for load in serving if load.total_blocks >= demand]
    return min(big_enough, default=None, key=lambda load: (-load.free_blocks, load.instance_id))


def _drain(rnd: _Round) -> None:
    for src in rnd.loads:
        if rnd.full():
            return
        if src.state == WorkerState.DRAINING and src.running + src.waiting > 0 and rnd.available(src):
            rnd.move_from(src, "drain", rnd.config.selector, _average_request_blocks(src),
                          lambda *_: True)


def _defrag(rnd: _Round) -> None:
    targets = [load for load in rnd.loads if load.instance_id in rnd.pending]   # zero or one
    for src in targets:
        if src.running > 0 and rnd.available(src) and not rnd.full():
            rnd.move_to_less_loaded(src, "defrag", rnd.config.selector,
                                    _average_request_blocks(src))


def _priority(rnd: _Round) -> None:
    short = [load for load in rnd.loads
             if load.state == WorkerState.SERVING and load.high_priority_running > 0
             and load.running > load.high_priority_running
             and load.free_blocks < _headroom_need(load, rnd.config)]
    for src in sorted(short, key=lambda load: (rnd.freeness(load), load.instance_id)):
        if rnd.full():
            return
        if rnd.available(src):
            rnd.move_to_less_loaded(src, "priority", "lowest_priority",
                                    _average_normal_request_blocks(src))


def _balance(rnd: _Round) -> None:
    sources = [load for load in rnd.loads if load.state == WorkerState.SERVING and load.running > 0]
    for src in sorted(sources, key=lambda load: (rnd.freeness(load), load.instance_id)):
        if rnd.full():
            return
        if rnd.available(src):
            f_src, gap = rnd.freeness(src), rnd.config.gap_threshold
            rnd.move_from(src, "balance", rnd.config.selector, _average_request_blocks(src),
                          _gap_shrinks(f_src, gap), beyond=lambda f_dst: not f_dst - f_src > gap)


def _gap_shrinks(f_src: float, threshold: float) -> Callable[[float, float, float], bool]:
    def accept(f_dst: float, f_dst_after: float, f_src_after: float) -> bool:
        return (f_dst - f_src > threshold and f_dst_after >= f_src
                and abs(f_dst_after - f_src_after) < abs(f_dst - f_src))
    return accept


_POLICY_STEPS: dict[str, Callable[[_Round], None]] = {
    "drain": _drain, "defrag": _defrag, "priority": _priority, "balance": _balance,
}
