"""The autoscaler's settings and memory: pools, hysteresis bands, replica bounds, the frozen
AutoscalerConfig (validated once, at construction) and the ScalerState that decide() carries from
one decision to the next (router/autoscale/autoscaler.py)."""
from __future__ import annotations

import dataclasses
import enum
import math

from services.roles import Role


class Pool(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"

    @property
    def role(self) -> Role:
        return Role.PREFILL if self is Pool.PREFILL else Role.DECODE


@dataclasses.dataclass(frozen=True)
class Band:
    """Hysteresis for one ratio: scale up above `up`, size toward `target`, scale down below
    `down`. Requires 0 < down < target < up."""
    down: float
    target: float
    up: float

    def check(self, name: str, upper: float | None = None) -> None:
        if not 0 < self.down < self.target < self.up:
            raise ValueError(f"{name}: need 0 < down < target < up, got down={self.down} "
                             f"target={self.target} up={self.up}")
        if upper is not None and self.up > upper:
            raise ValueError(f"{name}: up must be <= {upper}, got {self.up}")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Replica bounds of one Deployment: 1 <= min_replicas <= max_replicas. (Zero is refused: the
    router has no request buffering that would wake a pool scaled to zero.)"""
    min_replicas: int = 1
    max_replicas: int = 8

    def check(self, name: str) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"{name}: need 1 <= min_replicas <= max_replicas, got "
                             f"min={self.min_replicas} max={self.max_replicas}")

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclasses.dataclass(frozen=True)
class AutoscalerConfig:
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    prefill: Bounds = Bounds()
    decode: Bounds = Bounds()
    queue: Band = Band(down=0.1, target=0.3, up=0.6)     # prefill queue wait ÷ TTFT SLO
    kv: Band = Band(down=0.4, target=0.7, up=0.85)       # decode used ÷ total KV blocks
    tpot: Band = Band(down=0.4, target=0.7, up=0.9)      # decode step time ÷ TPOT SLO
    scale_up_cooldown_s: float = 30.0
    scale_down_cooldown_s: float = 300.0
    scale_down_stabilization_s: float = 300.0

    def __post_init__(self):
        for name in ("ttft_slo_s", "tpot_slo_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("scale_up_cooldown_s", "scale_down_cooldown_s",
                     "scale_down_stabilization_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.prefill.check("prefill replicas")
        self.decode.check("decode replicas")
        self.queue.check("queue band")
        self.kv.check("kv band", upper=1.0)
        self.tpot.check("tpot band")

    def bounds(self, pool: Pool) -> Bounds:
        return self.prefill if pool is Pool.PREFILL else self.decode


@dataclasses.dataclass(frozen=True)
class PoolHistory:
    last_up_s: float = -math.inf        # clock of the last scale-up
    last_down_s: float = -math.inf      # clock of the last scale-down (or failed drain)
    low_since_s: float | None = None    # below every `down` continuously since (None: not low)

    def observed(self, low: bool, now: float) -> "PoolHistory":
        since = (self.low_since_s if self.low_since_s is not None else now) if low else None
        return dataclasses.replace(self, low_since_s=since)


@dataclasses.dataclass(frozen=True)
class ScalerState:
    """What decide() remembers between calls: when each pool last changed and since when it has
    been below its scale-down band. decide() returns the state after its observation in
    Decision.state; the controller records an action on that with `recorded(pool, direction,
    now)` once it has taken effect."""
    prefill: PoolHistory = PoolHistory()
    decode: PoolHistory = PoolHistory()

    @classmethod
    def fresh(cls, now: float) -> "ScalerState":
        """For a new leader that knows no history: scale-up at once, scale-down only after a
        full scale-down cooldown from now."""
        h = PoolHistory(last_down_s=now)
        return cls(prefill=h, decode=h)

    def history(self, pool: Pool) -> PoolHistory:
        return self.prefill if pool is Pool.PREFILL else self.decode

    def recorded(self, pool: Pool, direction: int, now: float) -> "ScalerState":
        """direction > 0: a scale-up at `now`; < 0: a scale-down (or a drain that failed, which
        waits the same cooldown before the next try)."""
        h = self.history(pool)
        h = (dataclasses.replace(h, last_up_s=now) if direction > 0
             else dataclasses.replace(h, last_down_s=now))
        return dataclasses.replace(self, **{pool.value: h})
