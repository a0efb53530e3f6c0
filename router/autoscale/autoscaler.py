"""Autoscaler policy: instance loads → replica targets for the prefill and decode Deployments.

Pure: `decide(loads, replicas, state, now, config)` reads nothing and changes nothing; the
controller (router/autoscale/loop.py) feeds it the LoadReports the router already polls from Redis
and the Deployments' current replica counts, then acts on the Decision.

Signals, each a ratio compared with a hysteresis Band (scale up above `up`, down below `down`,
size toward `target`):

- prefill `queue`: the wait a new prompt would see, queued_prefill_tokens ÷ measured
  prefill_tokens_per_s summed over serving prefill instances, as a fraction of the TTFT SLO;
- decode `kv`: used ÷ total KV blocks over serving decode instances (reserved blocks are used);
- decode `tpot`: the mean engine step time per running request (≈ time per output token) as a
  fraction of the TPOT SLO.

Only instances in state `serving` are capacity: starting, draining, drained and stopping ones are
not. Scale-up sizes the pool proportionally (needed = ceil(serving × ratio ÷ target)) and counts
replicas already requested but not serving yet, so a slow start is not answered twice. Scale-down
removes one replica at a time, only when every signal of the pool is below its `down`, nothing
is starting or draining, and the pool would still be at or below `target` without it (so it does
not bounce back up). For decode it names the instance to drain by migration before the replica
goes: one already drained if there is one (it serves nothing), else the least loaded serving one.

Against flapping, besides the band: a scale-down needs the pool below `down` continuously for
scale_down_stabilization_s (a load that swings back up resets it), and waits
scale_down_cooldown_s after the pool's last change either way; a scale-up waits
scale_up_cooldown_s after the last scale-up and nothing else (react fast, shrink slowly). Bounds
(min/max replicas) apply to the Deployment's replicas and override cooldowns. Settings and state
types live in router/autoscale/config.py and are importable from here too.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from router.autoscale.config import (AutoscalerConfig, Band, Bounds, Pool, PoolHistory,  # noqa: F401
                                     ScalerState)
from router.prefill_rate import pool_prefill_rate
from services.load import used_blocks
from services.roles import OUT_OF_SERVICE, WorkerState, pool_role
from tandem.v1 import worker_pb2

LoadReport = worker_pb2.LoadReport

SERVING = WorkerState.SERVING


@dataclasses.dataclass(frozen=True)
class PoolDecision:
    """target == current: hold. drain: the decode instance to drain before replicas drop.
    history: the pool's history after this observation (before any action)."""
    pool: Pool
    current: int
    target: int
    reason: str
    drain: str | None = None
    signals: Mapping[str, float] = dataclasses.field(default_factory=dict)
    history: PoolHistory = PoolHistory()

    @property
    def direction(self) -> int:
        return (self.target > self.current) - (self.target < self.current)


@dataclasses.dataclass(frozen=True)
class Decision:
    prefill: PoolDecision
    decode: PoolDecision

    def __iter__(self):
        return iter((self.prefill, self.decode))

    @property
    def state(self) -> ScalerState:
        """The state to pass to the next decide() (record actions on it first)."""
        return ScalerState(prefill=self.prefill.history, decode=self.decode.history)


@dataclasses.dataclass(frozen=True)
class _PoolView:
    serving: list[LoadReport]
    out: int            # draining or drained: still a replica, not capacity
    draining: int
    drained: list[str]  # ids of drained instances (sorted): replicas that serve nothing
    pending: int        # replicas requested but not serving yet (starting, not registered)


def _view(loads: Iterable[LoadReport], pool: Pool, replicas: int) -> _PoolView:
    mine = sorted((r for r in loads if pool_role(r) == pool.role), key=lambda r: r.instance_id)
    serving = [r for r in mine if r.state == SERVING]
    out = sum(1 for r in mine if r.state in OUT_OF_SERVICE)
    draining = sum(1 for r in mine if r.state == WorkerState.DRAINING)
    drained = [r.instance_id for r in mine if r.state == WorkerState.DRAINED]
    return _PoolView(serving, out, draining, drained, max(0, replicas - len(serving) - out))


def _hold(pool, current, reason, signals) -> PoolDecision:
    return PoolDecision(pool, current, current, reason, signals=signals)


def queue_ratio(serving: list[LoadReport], ttft_slo_s: float) -> float | None:
    """Queued prefill work as a fraction of the TTFT SLO; None when work is queued but no
    instance has measured its rate yet. Instances without a measured rate count at the mean of
    those with one."""
    queued = sum(r.queued_prefill_tokens for r in serving)
    if queued == 0:
        return 0.0
    total_rate = pool_prefill_rate(serving)
    return None if total_rate is None else queued / total_rate / ttft_slo_s


def kv_ratio(serving: list[LoadReport]) -> float:
    total = sum(r.total_blocks for r in serving)
    return sum(used_blocks(r) for r in serving) / total if total else 0.0


def tpot_ratio(serving: list[LoadReport], tpot_slo_s: float) -> float:
    """Step time weighted by running requests (idle instances' step times are stale)."""
    running = sum(r.running for r in serving)
    if not running:
        return 0.0
    return sum(r.step_time_ms * r.running for r in serving) / running / 1000 / tpot_slo_s


def least_loaded(serving: list[LoadReport]) -> LoadReport:
    """The cheapest instance to drain: fewest used blocks, then fewest requests, then id."""
    return min(serving, key=lambda r: (used_blocks(r), r.running + r.waiting, r.instance_id))


def _bounded(pool, current, bounds, signals) -> PoolDecision | None:
    if current < bounds.min_replicas:
        return PoolDecision(pool, current, bounds.min_replicas,
                            f"below min_replicas {bounds.min_replicas}", signals=signals)
    return None


def _scale_up(pool, cfg, view, current, history, now, needed, signals, why) -> PoolDecision:
    bounds = cfg.bounds(pool)
    add = needed - len(view.serving) - view.pending
    if add <= 0:
        return _hold(pool, current, f"{why}; {view.pending} replica(s) already starting", signals)
    if current >= bounds.max_replicas:
        return _hold(pool, current, f"{why}; at max_replicas {bounds.max_replicas}", signals)
    if now - history.last_up_s < cfg.scale_up_cooldown_s:
        return _hold(pool, current, f"{why}; scale-up cooling down", signals)
    return PoolDecision(pool, current, min(bounds.max_replicas, current + add), why,
                        signals=signals)


def _down_blocked(pool, cfg, view, current, history, now, min_serving=2) -> str | None:
    """Why the pool, below its band now, may not lose a replica yet (None: it may)."""
    if current <= cfg.bounds(pool).min_replicas:
        return f"at min_replicas {cfg.bounds(pool).min_replicas}"
    if view.pending:
        return f"{view.pending} replica(s) still starting"
    if view.draining:
        return "an instance is draining (one at a time)"
    if len(view.serving) < min_serving:
        return f"fewer than {min_serving} serving instances"
    low_for = now - history.low_since_s
    if low_for < cfg.scale_down_stabilization_s:
        return f"low for {low_for:.0f}s of the {cfg.scale_down_stabilization_s:.0f}s needed"
    if now - max(history.last_up_s, history.last_down_s) < cfg.scale_down_cooldown_s:
        return "scale-down cooling down"
    return None


def decide_prefill(loads: list[LoadReport], current: int, history: PoolHistory, now: float,
                   cfg: AutoscalerConfig) -> PoolDecision:
    """The prefill Deployment's target (see the module docstring)."""
    pool = Pool.PREFILL
    view = _view(loads, pool, current)
    u = queue_ratio(view.serving, cfg.ttft_slo_s)
    history = history.observed(bool(view.serving) and u is not None and u < cfg.queue.down, now)
    signals = {"serving": len(view.serving), "queue": -1.0 if u is None else u}
    d = _prefill(cfg, view, current, history, now, u, signals)
    return dataclasses.replace(d, history=history)


def _prefill(cfg, view, current, history, now, u, signals) -> PoolDecision:
    pool, bounds = Pool.PREFILL, cfg.prefill
    if (d := _bounded(pool, current, bounds, signals)) is not None:
        return d
    if current > bounds.max_replicas:       # prefill holds no state worth draining
        return PoolDecision(pool, current, bounds.max_replicas,
                            f"above max_replicas {bounds.max_replicas}", signals=signals)
    if not view.serving:
        return _hold(pool, current, "no serving prefill instance yet", signals)
    if u is None:
        return _hold(pool, current, "prompts queued but no prefill rate measured yet", signals)
    n = len(view.serving)
    if u > cfg.queue.up:
        needed = math.ceil(n * u / cfg.queue.target)
        return _scale_up(pool, cfg, view, current, history, now, needed, signals,
                         f"prefill queue at {u:.2f} of the TTFT SLO (> {cfg.queue.up})")
    if u >= cfg.queue.down:
        return _hold(pool, current, "prefill queue within band", signals)
    if (blocked := _down_blocked(pool, cfg, view, current, history, now)) is not None:
        return _hold(pool, current, f"prefill below band; {blocked}", signals)
    if u * n / (n - 1) > cfg.queue.target:
        return _hold(pool, current, "one replica fewer would exceed the queue target", signals)
    return PoolDecision(pool, current, current - 1,
                        f"prefill queue at {u:.2f} of the TTFT SLO (< {cfg.queue.down})",
                        signals=signals)


def decide_decode(loads: list[LoadReport], current: int, history: PoolHistory, now: float,
                  cfg: AutoscalerConfig) -> PoolDecision:
    """The decode Deployment's target and, for a scale-down, the instance to drain first."""
    pool = Pool.DECODE
    view = _view(loads, pool, current)
    kv, tpot = kv_ratio(view.serving), tpot_ratio(view.serving, cfg.tpot_slo_s)
    history = history.observed(bool(view.serving) and kv < cfg.kv.down and tpot < cfg.tpot.down,
                               now)
    signals = {"serving": len(view.serving), "kv": kv, "tpot": tpot}
    d = _decode(cfg, view, current, history, now, kv, tpot, signals)
    return dataclasses.replace(d, history=history)


def _decode(cfg, view, current, history, now, kv, tpot, signals) -> PoolDecision:
    pool, bounds = Pool.DECODE, cfg.decode
    if (d := _bounded(pool, current, bounds, signals)) is not None:
        return d
    n = len(view.serving)
    if current > bounds.max_replicas:       # one at a time, drained first, no cooldown
        if view.draining:
            return _hold(pool, current, "above max_replicas; an instance is draining", signals)
        victim = (view.drained[0] if view.drained
                  else least_loaded(view.serving).instance_id if n > 1 else None)
        return PoolDecision(pool, current, current - 1, f"above max_replicas {bounds.max_replicas}",
                            drain=victim, signals=signals)
    if not view.serving:
        return _hold(pool, current, "no serving decode instance yet", signals)
    if kv > cfg.kv.up or tpot > cfg.tpot.up:
        needed = max(math.ceil(n * kv / cfg.kv.target), math.ceil(n * tpot / cfg.tpot.target))
        return _scale_up(pool, cfg, view, current, history, now, needed, signals,
                         f"decode KV at {kv:.2f} (up > {cfg.kv.up}), step at {tpot:.2f} of the "
                         f"TPOT SLO (up > {cfg.tpot.up})")
    if kv >= cfg.kv.down or tpot >= cfg.tpot.down:
        return _hold(pool, current, "decode within band", signals)
    if view.drained:                        # a replica that serves nothing goes first, as is
        if (blocked := _down_blocked(pool, cfg, view, current, history, now, 1)) is not None:
            return _hold(pool, current, f"decode below band; {blocked}", signals)
        return PoolDecision(pool, current, current - 1,
                            f"decode below band; removing drained {view.drained[0]}",
                            drain=view.drained[0], signals=signals)
    if (blocked := _down_blocked(pool, cfg, view, current, history, now)) is not None:
        return _hold(pool, current, f"decode below band; {blocked}", signals)
    victim = least_loaded(view.serving)
    remaining_blocks = sum(r.total_blocks for r in view.serving) - victim.total_blocks
    kv_after = sum(used_blocks(r) for r in view.serving) / remaining_blocks if remaining_blocks else 1.0
    if kv_after > cfg.kv.target or tpot * n / (n - 1) > cfg.tpot.target:
        return _hold(pool, current, "one replica fewer would exceed a decode target", signals)
    return PoolDecision(pool, current, current - 1,
                        f"decode KV at {kv:.2f} (< {cfg.kv.down}), step at {tpot:.2f} of the "
                        f"TPOT SLO (< {cfg.tpot.down}); draining the least loaded instance",
                        drain=victim.instance_id, signals=signals)


def decide(loads: Iterable[LoadReport], replicas: Mapping[Pool, int], state: ScalerState,
           now: float, cfg: AutoscalerConfig) -> Decision:
    """Targets for both pools. loads: every instance record (any role, any state); replicas: the
    Deployments' current spec.replicas; state: the previous Decision.state (with its actions
    recorded), or ScalerState.fresh(now) at first; now: seconds on the clock state uses."""
    loads = list(loads)
    return Decision(
        prefill=decide_prefill(loads, replicas[Pool.PREFILL], state.prefill, now, cfg),
        decode=decide_decode(loads, replicas[Pool.DECODE], state.decode, now, cfg))
