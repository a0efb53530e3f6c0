"""Autoscaler policy as a pure function: scripted scenarios over simulated time (burst, idle, slow
ramp, oscillation, bounds, draining instances), plus the signals and the config checks."""
from __future__ import annotations

import dataclasses
import math

import pytest

from router.autoscale.autoscaler import (AutoscalerConfig, Band, Bounds, Pool, PoolHistory, ScalerState,
                                         decide, decide_decode, decide_prefill, kv_ratio, least_loaded,
                                         queue_ratio, tpot_ratio)
from tandem.v1 import worker_pb2

P, D = worker_pb2.ROLE_PREFILL, worker_pb2.ROLE_DECODE
CFG = AutoscalerConfig(ttft_slo_s=2.0, tpot_slo_s=0.1, prefill=Bounds(1, 6), decode=Bounds(1, 6),
                       scale_up_cooldown_s=30, scale_down_cooldown_s=300)
TICK_S = 15
NEW = PoolHistory()                              # no history: not low yet
LOW = PoolHistory(low_since_s=-1e9)              # below the band for ages


def rec(iid, role=D, state="serving", total=1000, used=0, **kw):
    return worker_pb2.LoadReport(instance_id=iid, role=role, state=state, total_blocks=total,
                                 free_blocks=total - used, **kw)


# ---- a toy closed-loop cluster the scenarios drive ----------------------------------------

@dataclasses.dataclass
class SimInstance:
    iid: str
    pool: Pool
    created_s: float
    state: str = "starting"


class SimCluster:
    """Replicas start serving start_delay_s after they are requested. Prefill: prompts of
    prompt_len tokens arrive at the offered token rate; a backlog builds when that exceeds
    rate_per_instance × serving instances, and each busy instance also holds half a prompt in
    progress on average (what a snapshot of queued_prefill_tokens sees, by Little's law). Decode:
    the active sequences spread evenly, blocks_per_seq blocks each, step time 20 ms + 1 ms per
    running request."""

    def __init__(self, prefill=1, decode=1, start_delay_s=30, rate_per_instance=1000.0,
                 prompt_len=2000, blocks=1000, blocks_per_seq=10):
        self.start_delay_s, self.rate, self.blocks, self.bps = (start_delay_s, rate_per_instance,
                                                                blocks, blocks_per_seq)
        self.prompt_len = prompt_len
        self.instances: list[SimInstance] = []
        self.queue = 0.0
        self.offered = 0.0
        self.seqs = 0
        self._n = 0
        for pool, n in ((Pool.PREFILL, prefill), (Pool.DECODE, decode)):
            for _ in range(n):
                self._add(pool, -math.inf)
        self.step(0.0, 0.0, 0.0, 0)

    def _add(self, pool, now):
        self._n += 1
        self.instances.append(SimInstance(f"{pool.value[0]}{self._n}", pool, now))

    def replicas(self) -> dict[Pool, int]:
        return {p: sum(1 for i in self.instances if i.pool is p) for p in Pool}

    def serving(self, pool):
        return [i for i in self.instances if i.pool is pool and i.state == "serving"]

    def step(self, now, dt, prompt_tokens_per_s, active_seqs):
        for i in self.instances:
            if i.state == "starting" and now - i.created_s >= self.start_delay_s:
                i.state = "serving"
        capacity = self.rate * len(self.serving(Pool.PREFILL))
        self.queue = max(0.0, self.queue + (prompt_tokens_per_s - capacity) * dt)
        self.offered, self.seqs = prompt_tokens_per_s, active_seqs

    def loads(self) -> list[worker_pb2.LoadReport]:
        out = []
        pre, dec = self.serving(Pool.PREFILL), self.serving(Pool.DECODE)
        busy = min(len(pre), self.offered / self.rate)
        in_progress = busy * self.prompt_len / 2
        for i in self.instances:
            if i.pool is Pool.PREFILL:
                q = int((self.queue + in_progress) / len(pre)) if i.state == "serving" else 0
                out.append(rec(i.iid, P, i.state, queued_prefill_tokens=q,
                               prefill_tokens_per_s=self.rate))
            else:
                running = self.seqs // len(dec) if dec and i.state == "serving" else 0
                used = min(self.blocks, running * self.bps)
                out.append(rec(i.iid, D, i.state, total=self.blocks, used=used, running=running,
                               step_time_ms=20.0 + running))
        return out

    def apply(self, d, now):
        """Act as the controller would: drain first, then change replicas. Removal takes the
        drained instance (k8s deletes the unready pod first), else the newest."""
        if d.direction > 0:
            for _ in range(d.target - d.current):
                self._add(d.pool, now)
        elif d.direction < 0:
            for _ in range(d.current - d.target):
                mine = [i for i in self.instances if i.pool is d.pool]
                gone = next((i for i in mine if i.iid == d.drain), mine[-1])
                self.instances.remove(gone)


def run(sim, script, seconds, cfg=CFG, start_s=0.0):
    """Tick every TICK_S: script(t) → (prompt tokens/s, active decode sequences). Returns the
    list of (t, PoolDecision) that changed replicas, and the final state."""
    state, changes = ScalerState.fresh(start_s), []
    t = start_s
    while t < start_s + seconds:
        rate, seqs = script(t)
        sim.step(t, TICK_S, rate, seqs)
        decision = decide(sim.loads(), sim.replicas(), state, t, cfg)
        state = decision.state
        for d in decision:
            if d.direction:
                if d.pool is Pool.DECODE and d.direction < 0 and len(sim.serving(Pool.DECODE)) > 1:
                    assert d.drain is not None
                sim.apply(d, t)
                state = state.recorded(d.pool, d.direction, t)
                changes.append((t, d))
        t += TICK_S
    return changes, state


def only(changes, pool):
    return [(t, d) for t, d in changes if d.pool is pool]


# ---- scenarios ----------------------------------------------------------------------------

def test_burst_scales_prefill_and_decode_up_in_proportional_jumps():
    sim = SimCluster(prefill=1, decode=1)
    # Quiet for two minutes, then 4x one prefill instance's rate and 250 sequences (2.5x the KV).
    script = lambda t: (400.0, 20) if t < 120 else (4000.0, 250)
    changes, _ = run(sim, script, 900)
    pre, dec = only(changes, Pool.PREFILL), only(changes, Pool.DECODE)
    assert pre and dec and all(d.direction > 0 for _, d in pre + dec)    # no scale-down
    assert pre[0][0] <= 120 + 2 * TICK_S and dec[0][0] <= 120 + TICK_S  # reacts within ticks
    assert pre[0][1].target - pre[0][1].current > 1                      # a jump, not +1s
    assert dec[0][1].target - dec[0][1].current > 1
    assert sim.replicas()[Pool.PREFILL] >= 4                             # meets the offered rate
    assert sim.replicas()[Pool.DECODE] >= 4 and all(
        d.target <= CFG.decode.max_replicas for _, d in dec)
    # Scale-ups are cooldown apart.
    for (t0, _), (t1, _) in zip(pre, pre[1:]):
        assert t1 - t0 >= CFG.scale_up_cooldown_s


def test_idle_scales_down_one_at_a_time_draining_the_least_loaded():
    sim = SimCluster(prefill=4, decode=4)
    changes, _ = run(sim, lambda t: (0.0, 0), 3600)
    assert sim.replicas() == {Pool.PREFILL: 1, Pool.DECODE: 1}           # down to min
    for pool in Pool:
        steps = only(changes, pool)
        assert [d.current - d.target for _, d in steps] == [1, 1, 1]
        assert steps[0][0] >= CFG.scale_down_cooldown_s                  # a new leader waits
        for (t0, _), (t1, _) in zip(steps, steps[1:]):
            assert t1 - t0 >= CFG.scale_down_cooldown_s
    assert [d.drain for _, d in only(changes, Pool.DECODE)][:2] == ["d5", "d6"]   # ties → id


def test_decode_scale_down_drains_the_instance_with_the_fewest_used_blocks():
    loads = [rec("d1", used=30, running=3), rec("d2", used=10, running=5), rec("d3", used=10,
             running=1), rec("p1", role=P, prefill_tokens_per_s=100.0)]
    d = decide_decode(loads, 3, LOW, 1000.0, CFG)
    assert (d.target, d.drain) == (2, "d3")
    assert least_loaded([rec("b", used=5), rec("a", used=5)]).instance_id == "a"


def test_slow_ramp_only_ever_scales_up():
    sim = SimCluster(prefill=1, decode=1)
    # Over two hours: prompt rate 200 → 5000 tok/s, sequences 10 → 500.
    script = lambda t: (200 + 4800 * t / 7200, int(10 + 490 * t / 7200))
    changes, _ = run(sim, script, 7200)
    assert changes and all(d.direction > 0 for _, d in changes)
    assert sim.replicas()[Pool.PREFILL] >= 5 and sim.replicas()[Pool.DECODE] == 6
    # Gradual load, gradual steps: no jump beyond what the last tick's load asked for.
    for _, d in only(changes, Pool.DECODE):
        assert d.target - d.current <= 2


def test_oscillating_load_does_not_flap():
    sim = SimCluster(prefill=1, decode=2)
    # Decode load swings every tick between high and very low; prefill between busy and idle.
    script = lambda t: (3000.0, 180) if (t // TICK_S) % 2 == 0 else (0.0, 5)
    changes, _ = run(sim, script, 3600)
    for pool in Pool:
        directions = [d.direction for _, d in only(changes, pool)]
        flips = sum(1 for a, b in zip(directions, directions[1:]) if a != b)
        assert flips <= 1, (pool, directions)
        downs = [t for t, d in only(changes, pool) if d.direction < 0]
        ups = [t for t, d in only(changes, pool) if d.direction > 0]
        assert not (downs and ups and min(downs) < max(ups)), "scaled down, then up again"
    # Load that dips below the band every other tick (in band otherwise) never shrinks the pool.
    sim = SimCluster(prefill=3, decode=3)
    script = lambda t: (1800.0, 150) if (t // TICK_S) % 2 == 0 else (0.0, 30)
    changes, _ = run(sim, script, 3 * 3600)
    assert changes == []


def test_load_inside_the_band_holds_steady():
    sim = SimCluster(prefill=2, decode=2)
    # KV at 0.6 (between down 0.4 and up 0.85), prefill queue near the target.
    changes, _ = run(sim, lambda t: (1900.0, 120), 3600)
    assert changes == []


def test_scale_down_guard_refuses_a_removal_that_would_bounce_back():
    # Two decode instances at 0.35 KV: below down (0.4), but one instance would sit at 0.7+.
    loads = [rec("d1", used=360, running=36), rec("d2", used=350, running=35)]
    d = decide_decode(loads, 2, LOW, 1000.0, CFG)
    assert d.direction == 0 and "exceed" in d.reason
    # Prefill: queue at 0.045 of the SLO on 2 instances → 0.09 on one: under the 0.3 target,
    # over a 0.08 one.
    pre = [rec(f"p{i}", P, queued_prefill_tokens=9, prefill_tokens_per_s=100.0) for i in range(2)]
    tight = dataclasses.replace(CFG, queue=Band(down=0.05, target=0.08, up=0.5))
    assert decide_prefill(pre, 2, LOW, 1000.0, CFG).direction == -1
    assert decide_prefill(pre, 2, LOW, 1000.0, tight).direction == 0


def test_min_and_max_bounds():
    cfg = dataclasses.replace(CFG, prefill=Bounds(2, 3), decode=Bounds(2, 3))
    sim = SimCluster(prefill=1, decode=1)
    # Below min: raised at once (a fresh leader, before any cooldown), whatever the load.
    changes, _ = run(sim, lambda t: (0.0, 0), TICK_S, cfg=cfg)
    assert sorted((d.pool.value, d.current, d.target) for _, d in changes) == [
        ("decode", 1, 2), ("prefill", 1, 2)]
    # A huge burst never goes past max.
    sim = SimCluster(prefill=2, decode=2)
    changes, _ = run(sim, lambda t: (50_000.0, 5000), 1800, cfg=cfg)
    assert sim.replicas() == {Pool.PREFILL: 3, Pool.DECODE: 3}
    assert all(d.target <= 3 for _, d in changes)
    # Above max (max lowered): prefill straight to max; decode one at a time, each drained,
    # without waiting for a cooldown, even under load.
    sim = SimCluster(prefill=5, decode=5)
    changes, _ = run(sim, lambda t: (500.0, 100), 4 * TICK_S, cfg=cfg)
    assert [(d.current, d.target) for _, d in only(changes, Pool.PREFILL)] == [(5, 3)]
    dec = only(changes, Pool.DECODE)
    assert [(d.current, d.target) for _, d in dec] == [(5, 4), (4, 3)]
    assert all(d.drain for _, d in dec)


def test_draining_instances_are_not_capacity():
    # One serving decode at 0.9 KV and two draining (empty) ones: the pool is full, not at 0.3.
    loads = [rec("d1", used=900, running=90, step_time_ms=50.0),
             rec("d2", state="draining"), rec("d3", state="drained")]
    d = decide_decode(loads, 3, LOW, 0.0, CFG)
    assert d.signals["kv"] == pytest.approx(0.9) and d.signals["serving"] == 1
    assert d.direction == 1 and d.target == 4     # needs ceil(0.9/0.7)=2 serving: +1
    # No scale-down while one is draining, however idle the rest is.
    idle = [rec(f"d{i}") for i in range(3)] + [rec("d9", state="draining")]
    d = decide_decode(idle, 4, LOW, 10_000.0, CFG)
    assert d.direction == 0 and "draining" in d.reason


def test_replicas_still_starting_are_not_requested_twice():
    # 2 replicas requested, 1 serving (1 not registered yet), queue needs 2 in all → hold.
    pre = [rec("p1", P, queued_prefill_tokens=1600, prefill_tokens_per_s=1000.0)]
    d = decide_prefill(pre, 2, LOW, 0.0, CFG)   # ratio 0.8 → needs ceil(0.8/0.3)=3
    assert (d.current, d.target) == (2, 3)
    d = decide_prefill(pre + [rec("p2", P, state="starting")], 3, LOW, 0.0, CFG)
    assert d.direction == 0 and "starting" in d.reason
    # And nothing scales down while a replica is starting.
    quiet = [rec("p1", P), rec("p2", P), rec("p3", P, state="starting")]
    assert decide_prefill(quiet, 3, LOW, 10_000.0, CFG).direction == 0


def test_cooldowns_are_separate_for_up_and_down():
    busy = [rec("d1", used=950, running=95), rec("d2", used=950, running=95)]
    upped = ScalerState().recorded(Pool.DECODE, +1, 100.0).decode
    assert decide_decode(busy, 2, upped, 100.0 + 29, CFG).direction == 0
    assert decide_decode(busy, 2, upped, 100.0 + 30, CFG).direction == 1
    idle = [rec("d1"), rec("d2"), rec("d3")]
    for direction in (+1, -1):              # after a change either way, down waits its cooldown
        h = dataclasses.replace(ScalerState().recorded(Pool.DECODE, direction, 100.0).decode,
                                low_since_s=-1e9)
        assert decide_decode(idle, 3, h, 100.0 + 299, CFG).direction == 0
        assert decide_decode(idle, 3, h, 100.0 + 300, CFG).direction == -1
    # A scale-down in one pool does not delay the other.
    state = ScalerState(prefill=LOW).recorded(Pool.DECODE, -1, 100.0)
    pre = [rec("p1", P), rec("p2", P)]
    assert decide(pre + idle, {Pool.PREFILL: 2, Pool.DECODE: 3}, state, 101.0,
                  CFG).prefill.direction == -1


def test_scale_down_needs_the_pool_low_for_the_whole_stabilization_window():
    idle = [rec("d1"), rec("d2")]
    busy = [rec("d1", used=600, running=60), rec("d2", used=600, running=60)]
    d = decide_decode(idle, 2, NEW, 1000.0, CFG)
    assert d.direction == 0 and d.history.low_since_s == 1000.0 and "low for 0s" in d.reason
    h = d.history
    assert decide_decode(idle, 2, h, 1000.0 + 299, CFG).direction == 0
    d = decide_decode(idle, 2, h, 1000.0 + 300, CFG)
    assert d.direction == -1 and d.history.low_since_s == 1000.0
    # One busy observation in between starts the window again.
    h = decide_decode(busy, 2, h, 1100.0, CFG).history
    assert h.low_since_s is None
    h = decide_decode(idle, 2, h, 1200.0, CFG).history
    assert decide_decode(idle, 2, h, 1400.0, CFG).direction == 0
    assert decide_decode(idle, 2, h, 1500.0, CFG).direction == -1


def test_prefill_waits_for_a_measured_rate():
    pre = [rec("p1", P, queued_prefill_tokens=5000)]
    d = decide_prefill(pre, 1, LOW, 0.0, CFG)
    assert d.direction == 0 and "rate" in d.reason
    # An instance without a rate yet counts at the mean of the measured ones.
    pre = [rec("p1", P, queued_prefill_tokens=3000, prefill_tokens_per_s=1000.0),
           rec("p2", P, queued_prefill_tokens=1000)]
    assert queue_ratio(pre, 2.0) == pytest.approx(4000 / 2000 / 2.0)
    assert queue_ratio([rec("p1", P)], 2.0) == 0.0


def test_signals():
    serving = [rec("d1", used=500, running=10, step_time_ms=40.0),
               rec("d2", used=100, running=0, step_time_ms=500.0)]    # idle: stale step time
    assert kv_ratio(serving) == pytest.approx(0.3)
    assert tpot_ratio(serving, 0.1) == pytest.approx(0.4)
    assert kv_ratio([]) == 0.0 and tpot_ratio([], 0.1) == 0.0


def test_tpot_alone_scales_decode_up():
    slow = [rec("d1", used=100, running=40, step_time_ms=120.0)]      # 1.2x the TPOT SLO
    d = decide_decode(slow, 1, LOW, 0.0, CFG)
    assert d.direction == 1 and d.target == math.ceil(1.2 / 0.7) and "TPOT" in d.reason


def test_an_instance_switched_to_both_roles_stays_in_its_home_pool():
    # adaptive pools: a decode instance with a standing prefill share reports role COLOCATED
    slow = [rec("d1", worker_pb2.ROLE_COLOCATED, used=100, running=40, step_time_ms=120.0, home_role=D)]
    d = decide_decode(slow, 1, LOW, 0.0, CFG)
    assert d.signals["serving"] == 1 and d.direction == 1
    assert decide_prefill(slow, 1, LOW, 0.0, CFG).signals["serving"] == 0


def test_no_serving_instances_holds_above_min():
    d = decide(
        [rec("p1", P, state="starting"), rec("d1", state="starting")],
        {Pool.PREFILL: 1, Pool.DECODE: 1}, ScalerState(LOW, LOW), 0.0, CFG)
    assert d.prefill.direction == 0 and d.decode.direction == 0


@pytest.mark.parametrize("kw, message", [
    ({"ttft_slo_s": 0}, "ttft_slo_s"),
    ({"tpot_slo_s": -1}, "tpot_slo_s"),
    ({"prefill": Bounds(0, 2)}, "prefill replicas"),
    ({"decode": Bounds(3, 2)}, "decode replicas"),
    ({"kv": Band(0.5, 0.4, 0.9)}, "kv band"),
    ({"kv": Band(0.5, 0.8, 1.2)}, "up must be <= 1"),
    ({"queue": Band(0.0, 0.3, 0.6)}, "queue band"),
    ({"scale_down_cooldown_s": -1}, "scale_down_cooldown_s"),
])
def test_config_rejects_nonsense(kw, message):
    with pytest.raises(ValueError, match=message):
        AutoscalerConfig(**kw)


def test_a_drained_decode_instance_is_removed_before_another_is_drained():
    # d3 was drained (say its replica could not be removed last time): it goes, no new drain,
    # even with a single serving instance left.
    loads = [rec("d1", used=100, running=5), rec("d3", state="drained")]
    d = decide_decode(loads, 2, LOW, 10_000.0, CFG)
    assert (d.target, d.drain) == (1, "d3")
    # Not below the band: it stays (an operator may have drained it on purpose).
    busy = [rec("d1", used=600, running=60), rec("d3", state="drained")]
    assert decide_decode(busy, 2, LOW, 10_000.0, CFG).direction == 0


def test_above_max_removes_a_drained_instance_first():
    cfg = dataclasses.replace(CFG, decode=Bounds(1, 2))
    loads = [rec("d1", used=10), rec("d2", used=0), rec("d3", state="drained")]
    assert decide_decode(loads, 3, NEW, 0.0, cfg).drain == "d3"
    assert decide_decode(loads[:2], 3, NEW, 0.0, cfg).drain == "d2"
