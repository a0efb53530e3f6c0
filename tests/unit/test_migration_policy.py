"""Rescheduler policy: hand-made scenarios per policy, a block-accounting simulator that applies
decisions over rounds, and seeded randomised invariant checks on synthetic loads."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest

from types import SimpleNamespace

from router.migration.policy import (MigrationDecision, PolicyConfig, decide, freeness, migration_groups,
                                     virtual_usage)
from tandem.v1 import worker_pb2

LoadReport = worker_pb2.LoadReport      # the one load record the policy reads (services/load.py)

STATES = ("serving", "draining", "drained", "starting", "stopping")
POLICIES = ("drain", "defrag", "priority", "balance")
SELECTORS = ("shortest", "longest", "lowest_priority")

# Round numbers so that hand-made scenarios read exactly.
CFG = PolicyConfig(gap_threshold=5.0, high_priority_headroom_blocks=10, free_watermark_blocks=0,
                   max_migrations_per_instance=1, max_decisions_per_round=8)


def load(instance_id, free, running, total=100, **kw) -> LoadReport:
    return LoadReport(instance_id=instance_id, total_blocks=total, free_blocks=free, running=running,
                      state=kw.pop("state", "serving"), **kw)


def replaced(report: LoadReport, **fields) -> LoadReport:
    """A copy of report with fields changed."""
    copy = LoadReport()
    copy.CopyFrom(report)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


def pairs(decisions):
    return [(d.source, d.destination, d.reason) for d in decisions]


# ---------------------------------------------------------------- a block-accounting cluster
@dataclasses.dataclass
class Req:
    request_id: str
    blocks: int
    priority: int = 0


@dataclasses.dataclass
class Inst:
    instance_id: str
    total: int
    requests: list[Req]
    state: str = "serving"

    def load(self) -> LoadReport:
        used = sum(r.blocks for r in self.requests)
        high = [r for r in self.requests if r.priority > 0]
        return LoadReport(instance_id=self.instance_id, total_blocks=self.total, free_blocks=self.total - used,
                          running=len(self.requests), high_priority_running=len(high),
                          high_priority_blocks=sum(r.blocks for r in high), state=self.state)


def apply(cluster: dict[str, Inst], decision: MigrationDecision) -> Req:
    """Move the request the decision's selector names; migrations complete within the round."""
    src, dst = cluster[decision.source], cluster[decision.destination]
    key = {"shortest": lambda r: (r.blocks, r.request_id),
           "longest": lambda r: (-r.blocks, r.request_id),
           "lowest_priority": lambda r: (r.priority, r.blocks, r.request_id)}[decision.selector]
    req = min(src.requests, key=key)
    src.requests.remove(req)
    dst.requests.append(req)
    assert sum(r.blocks for r in dst.requests) <= dst.total
    return req


def run_rounds(cluster, config, max_rounds=500) -> list[MigrationDecision]:
    """Apply decide() round after round until it returns nothing; every decision made."""
    made = []
    for _ in range(max_rounds):
        decisions = decide([inst.load() for inst in cluster.values()], config)
        if not decisions:
            return made
        for d in decisions:
            apply(cluster, d)
        made += decisions
    raise AssertionError(f"still migrating after {max_rounds} rounds: {made[-8:]}")


# ---------------------------------------------------------------- load arithmetic
def test_virtual_usage_and_freeness():
    a = load("a", free=40, running=3, head_waiting_blocks=5, high_priority_running=2,
             high_priority_blocks=12)
    assert virtual_usage(a, CFG) == 60 + 5 + 2 * 10
    assert virtual_usage(a, CFG, pending_demand_blocks=7) == 92
    assert freeness(a, CFG) == (100 - 85) / 3
    assert freeness(load("idle", free=100, running=0), CFG) == 100.0          # divide by 1
    assert freeness(load("over", free=0, running=2, head_waiting_blocks=20), CFG) == -10.0
    assert freeness(load("d", free=100, running=0, state="draining"), CFG) == -math.inf


def test_reads_the_report_and_counts_the_callers_migrations_in_flight():
    busy, idle = load("busy", free=10, running=9), load("idle", free=100, running=0)
    assert pairs(decide([busy, idle], CFG)) == [("busy", "idle", "balance")]
    # A migration the caller launched counts before the worker's report shows it...
    assert decide([busy, idle], CFG, in_flight={"idle": 1}) == []
    # ...and the report's own count holds when it is the higher one.
    shown = load("idle", free=100, running=0, migrations_in_flight=1)
    assert decide([busy, shown], CFG, in_flight={"idle": 0}) == []
    assert pairs(decide([busy, idle], CFG, in_flight={"other": 1})) == [("busy", "idle", "balance")]


@pytest.mark.parametrize("kwargs", [
    {"policies": ("balance", "shuffle")}, {"policies": ("drain", "drain")},
    {"selector": "random"}, {"gap_threshold": -1}, {"free_watermark_blocks": -0.1},
    {"high_priority_headroom_blocks": -1}, {"max_migrations_per_instance": 0},
    {"max_decisions_per_round": 0},
])
def test_config_refuses_nonsense(kwargs):
    with pytest.raises(ValueError):
        PolicyConfig(**kwargs)


def test_duplicate_instance_ids_raise():
    with pytest.raises(ValueError, match="duplicate"):
        decide([load("a", 50, 1), load("a", 60, 1)], CFG)


# ---------------------------------------------------------------- balance
def test_nothing_to_do_when_balanced():
    loads = [load("a", free=40, running=3), load("b", free=42, running=3),
             load("c", free=38, running=3)]
    assert decide(loads, CFG) == []
    assert decide([], CFG) == []
    assert decide([load("only", free=0, running=9)], CFG) == []


def test_balance_pairs_most_loaded_with_least_loaded():
    loads = [load("busy1", free=10, running=9),      # F 10/9
             load("busy2", free=20, running=8),      # F 2.5
             load("mid", free=50, running=5),        # F 10
             load("idle1", free=100, running=0),     # F 100
             load("idle2", free=90, running=1)]      # F 90
    # mid is left alone: both idle instances are taken this round.
    assert pairs(decide(loads, CFG)) == [("busy1", "idle1", "balance"),
                                         ("busy2", "idle2", "balance")]
    assert all(d.selector == "shortest" and d.request_id == "" for d in decide(loads, CFG))
    longest = dataclasses.replace(CFG, selector="longest")
    assert {d.selector for d in decide(loads, longest)} == {"longest"}


def test_balance_needs_a_gap_above_the_threshold():
    loads = [load("a", free=100, running=10, total=200),                      # F 10
             load("b", free=160, running=10, total=200)]                      # F 16
    assert decide(loads, dataclasses.replace(CFG, gap_threshold=6.0)) == []    # gap 6, not > 6
    # Moving one 10-block request: F 110/9 ≈ 12.2 and 150/11 ≈ 13.6, the gap shrinks.
    assert pairs(decide(loads, dataclasses.replace(CFG, gap_threshold=5.9))) == \
        [("a", "b", "balance")]


def test_balance_refuses_a_move_that_only_swaps_the_load():
    # One 80-block request: moving it makes b what a was; the gap does not shrink.
    assert decide([load("a", free=20, running=1), load("b", free=100, running=0)], CFG) == []


def test_balance_converges_on_a_simulated_cluster():
    cluster = {"a": Inst("a", 200, [Req(f"r{i}", 10) for i in range(12)]),
               "b": Inst("b", 200, [Req("s0", 10)]),
               "c": Inst("c", 200, []),
               "d": Inst("d", 200, [])}
    made = run_rounds(cluster, CFG)
    assert {d.reason for d in made} == {"balance"} and len(made) >= 6
    assert sorted(len(inst.requests) for inst in cluster.values()) == [3, 3, 3, 4]


def test_in_flight_migrations_and_round_cap_limit_decisions():
    loads = [load("a", free=10, running=9), load("b", free=100, running=0, migrations_in_flight=1),
             load("c", free=95, running=1)]
    assert pairs(decide(loads, CFG)) == [("a", "c", "balance")]       # b is busy migrating
    two = dataclasses.replace(CFG, max_migrations_per_instance=2)
    assert pairs(decide(loads, two)) == [("a", "b", "balance")]

    many = [load(f"busy{i}", free=5, running=9) for i in range(4)] + \
           [load(f"idle{i}", free=100, running=0) for i in range(4)]
    assert len(decide(many, CFG)) == 4
    assert len(decide(many, dataclasses.replace(CFG, max_decisions_per_round=3))) == 3


def test_no_destination_when_all_are_full():
    loads = [load("a", free=2, running=8), load("b", free=3, running=9),
             load("c", free=1, running=9),
             load("d", free=4, running=5, state="draining")]
    wm = dataclasses.replace(CFG, free_watermark_blocks=0.05)         # 5 blocks must stay free
    assert decide(loads, wm) == []
    # A watermark in blocks works the same way; the emptiest instance is still too full.
    roomier = loads + [load("e", free=30, running=1)]      # 30 - 13 moved < 25
    assert decide(roomier, dataclasses.replace(CFG, free_watermark_blocks=25)) == []


def test_starting_stopping_and_drained_instances_take_no_part():
    loads = [load("busy", free=5, running=9)] + [load(s, free=100, running=0, state=s)
                                                 for s in ("starting", "stopping", "drained")]
    assert decide(loads, CFG) == []
    stopping = load("stop", free=5, running=9, state="stopping")
    assert decide([stopping, load("idle", 100, 0)], CFG) == []


# ---------------------------------------------------------------- drain
def test_draining_is_never_a_destination():
    loads = [load("busy", free=5, running=9), load("empty-draining", free=100, running=0,
                                                  state="draining")]
    assert decide(loads, CFG) == []
    loads.append(load("ok", free=60, running=2))
    assert pairs(decide(loads, CFG)) == [("busy", "ok", "balance")]


def test_drain_moves_regardless_of_gap_and_uses_the_configured_selector():
    loads = [load("d", free=90, running=1, state="draining"),     # nearly empty
             load("a", free=10, running=9), load("b", free=20, running=8)]
    assert decide(loads, CFG) == [MigrationDecision("d", "b", "drain", "shortest")]
    cfg = dataclasses.replace(CFG, selector="longest")
    assert decide(loads, cfg) == [MigrationDecision("d", "b", "drain", "longest")]
    # Waiting-only: the head request's demand must fit.
    waiting = [load("d", free=100, running=0, waiting=2, head_waiting_blocks=15, state="draining"),
               load("a", free=12, running=8)]
    assert decide(waiting, CFG) == []
    assert pairs(decide(waiting + [load("b", free=16, running=8)], CFG)) == [("d", "b", "drain")]
    # Drained, or draining with nothing left: nothing to do.
    assert decide([load("d", 100, 0, state="draining"), load("a", 100, 0)], CFG) == []


def test_drain_empties_to_several_destinations_over_rounds():
    cluster = {"d": Inst("d", 200, [Req(f"r{i}", 5 + 3 * i, priority=i % 2) for i in range(10)],
                         state="draining"),
               "a": Inst("a", 200, [Req("a0", 40)]),
               "b": Inst("b", 200, [Req("b0", 30), Req("b1", 20)]),
               "c": Inst("c", 100, [Req("c0", 60)])}
    made = run_rounds(cluster, CFG)
    assert cluster["d"].requests == []
    drains = [d for d in made if d.reason == "drain"]
    assert len(drains) == 10
    assert len({d.destination for d in drains}) >= 2
    assert all(d.destination != "d" for d in made)
    moved = sorted(r.request_id for inst in cluster.values() for r in inst.requests)
    assert moved == sorted(["a0", "b0", "b1", "c0"] + [f"r{i}" for i in range(10)])


def test_drain_comes_before_balance_and_claims_its_instances():
    loads = [load("d", free=50, running=5, state="draining"), load("busy", free=5, running=9),
             load("idle", free=100, running=0)]
    assert pairs(decide(loads, CFG)) == [("d", "idle", "drain")]
    balance_first = dataclasses.replace(CFG, policies=("balance", "drain"))
    assert pairs(decide(loads, balance_first)) == [("busy", "idle", "balance")]
    assert decide(loads, dataclasses.replace(CFG, policies=("balance",))) == \
        [MigrationDecision("busy", "idle", "balance", "shortest")]


# ---------------------------------------------------------------- defrag
def test_defrag_frees_room_on_the_instance_with_most_free_blocks():
    loads = [load("a", free=20, running=4), load("b", free=25, running=3),
             load("c", free=25, running=3), load("x", free=10, running=9, state="draining")]
    # A 30-block request is queued; nobody has 30 free. b and c tie on 25 free: b is the target.
    only = dataclasses.replace(CFG, policies=("defrag",))
    assert pairs(decide(loads, only, pending_demand_blocks=30)) == [("b", "c", "defrag")]
    # Without the demand the three are balanced.
    assert decide(loads, dataclasses.replace(CFG, policies=("defrag", "balance"))) == []


def test_defrag_stops_once_some_instance_has_room():
    loads = [load("a", free=20, running=4), load("b", free=30, running=7)]
    assert decide(loads, CFG, pending_demand_blocks=30) == []
    assert pairs(decide(loads, CFG, pending_demand_blocks=31)) == [("b", "a", "defrag")]


def test_defrag_ignores_demand_no_instance_could_hold():
    loads = [load("a", free=20, running=4), load("b", free=25, running=3)]
    assert decide(loads, CFG, pending_demand_blocks=101) == []


def test_defrag_target_is_not_refilled_by_balance():
    loads = [load("a", free=5, running=9), load("b", free=25, running=1)]
    assert pairs(decide(loads, CFG)) == [("a", "b", "balance")]
    # A queued 40-block request makes b the defrag target: a has no room for b's request, and
    # balance must not fill b up with one of a's.
    assert decide(loads, CFG, pending_demand_blocks=40) == []


def test_defrag_over_rounds_makes_room():
    cluster = {"a": Inst("a", 100, [Req("a0", 20), Req("a1", 20), Req("a2", 20)]),
               "b": Inst("b", 100, [Req("b0", 15), Req("b1", 15), Req("b2", 15), Req("b3", 15)]),
               "c": Inst("c", 100, [Req("c0", 40), Req("c1", 25)])}
    demand = 50
    cfg = dataclasses.replace(CFG, policies=("defrag",))
    moves = []
    for _ in range(10):
        loads = [inst.load() for inst in cluster.values()]
        if any(x.free_blocks >= demand for x in loads):
            break
        decisions = decide(loads, cfg, pending_demand_blocks=demand)
        assert [d.reason for d in decisions] == ["defrag"]
        moves.append(apply(cluster, decisions[0]))
    assert moves and {r.request_id[0] for r in moves} == {"a"}  # a: 40 free, first id
    assert max(inst.load().free_blocks for inst in cluster.values()) >= demand
    loads = [inst.load() for inst in cluster.values()]
    assert decide(loads, cfg, pending_demand_blocks=demand) == []


# ---------------------------------------------------------------- priority
def test_priority_moves_normal_requests_off_an_instance_short_of_headroom():
    # 3 high-priority requests need 30 blocks of headroom; only 12 free.
    hot = load("hot", free=12, running=5, high_priority_running=3, high_priority_blocks=60)
    loads = [hot, load("a", free=50, running=4), load("b", free=70, running=2)]
    only = dataclasses.replace(CFG, policies=("priority",))
    assert decide(loads, only) == [MigrationDecision("hot", "b", "priority", "lowest_priority")]
    # Enough headroom, or nothing but high-priority requests running: nothing to do.
    assert decide([replaced(hot, free_blocks=30), *loads[1:]], only) == []
    all_high = replaced(hot, high_priority_running=5, high_priority_blocks=88)
    assert decide([all_high, *loads[1:]], only) == []


def test_priority_never_eats_a_destinations_headroom():
    hot = load("hot", free=12, running=5, high_priority_running=3, high_priority_blocks=60)
    # Normal requests on hot average (88 - 60) / 2 = 14 blocks. `vip` has 30 free but needs 20
    # for its own two high-priority requests: 30 - 14 < 20.
    vip = load("vip", free=30, running=2, high_priority_running=2, high_priority_blocks=40)
    only = dataclasses.replace(CFG, policies=("priority",))
    assert decide([hot, vip], only) == []
    roomy = replaced(vip, free_blocks=34)                  # 34 - 14 = 20: just fits
    assert pairs(decide([hot, roomy], only)) == [("hot", "vip", "priority")]


# ---------------------------------------------------------------- determinism
def test_result_does_not_depend_on_input_order():
    loads = [load(f"i{k}", free=10 * k, running=9 - k) for k in range(9)]
    expected = decide(loads, CFG)
    assert expected
    rng = random.Random(3)
    for _ in range(20):
        rng.shuffle(loads)
        assert decide(loads, CFG) == expected


# ---------------------------------------------------------------- randomised invariants
def random_load(rng: random.Random, instance_id: str) -> LoadReport:
    total = rng.choice([16, 64, 256, rng.randint(1, 2000)])
    free = total if rng.random() < 0.2 else rng.randint(0, total)
    used = total - free
    running = rng.randint(0, min(used, 40))                  # a running request holds ≥ 1 block
    high = rng.randint(0, running) if rng.random() < 0.4 else 0
    high_blocks = rng.randint(high, used - (running - high)) if high else 0
    waiting = rng.choice([0, 0, 0, rng.randint(1, 6)])
    return LoadReport(
        instance_id=instance_id, total_blocks=total, free_blocks=free, running=running, waiting=waiting,
        head_waiting_blocks=rng.randint(1, total) if waiting else 0,
        high_priority_running=high, high_priority_blocks=high_blocks,
        migrations_in_flight=rng.choice([0, 0, 0, 1, 2]),
        state=rng.choices(STATES, weights=[10, 3, 1, 1, 1])[0])


def random_config(rng: random.Random) -> PolicyConfig:
    return PolicyConfig(
        policies=tuple(rng.sample(POLICIES, rng.randint(1, 4))) if rng.random() < 0.5 else POLICIES,
        gap_threshold=rng.choice([0.0, 1.0, 8.0, 40.0, rng.uniform(0, 20)]),
        high_priority_headroom_blocks=rng.choice([0, 4, 16, 64]),
        free_watermark_blocks=rng.choice([0, 2, 10, 0.05, 0.2]),
        max_migrations_per_instance=rng.randint(1, 3),
        max_decisions_per_round=rng.randint(1, 8),
        selector=rng.choice(SELECTORS))


def oracle_headroom(x: LoadReport, cfg: PolicyConfig) -> int:
    return x.high_priority_running * cfg.high_priority_headroom_blocks


def oracle_usage(x: LoadReport, cfg: PolicyConfig, pending: int = 0) -> int:
    used = x.total_blocks - x.free_blocks
    return used + x.head_waiting_blocks + pending + oracle_headroom(x, cfg)


def oracle_freeness(x: LoadReport, cfg: PolicyConfig, pending: int = 0) -> float:
    if x.state == "draining":
        return -math.inf
    return (x.total_blocks - oracle_usage(x, cfg, pending)) / max(x.running, 1)


def oracle_moved_blocks(x: LoadReport, reason: str) -> int:
    used = x.total_blocks - x.free_blocks
    if reason == "priority":
        return math.ceil((used - x.high_priority_blocks) / (x.running - x.high_priority_running))
    return math.ceil(used / x.running) if x.running else x.head_waiting_blocks


def oracle_watermark(x: LoadReport, cfg: PolicyConfig) -> int:
    w = cfg.free_watermark_blocks
    return math.ceil(w * x.total_blocks if w < 1 else w)


def moved(x: LoadReport, blocks: int, incoming: bool) -> LoadReport:
    """x after one request of `blocks` blocks arrived or left (block accounting only)."""
    sign = 1 if incoming else -1
    fields = {f.name: getattr(x, f.name) for f in x.DESCRIPTOR.fields if f.name != "requests"}
    fields.update(free_blocks=x.free_blocks - sign * blocks, running=x.running + sign)
    return SimpleNamespace(**fields)      # may go below zero, which a LoadReport's uint32 cannot


def check_decisions(loads, cfg, demand, decisions, seen):
    by_id = {x.instance_id: x for x in loads}
    serving = [x for x in loads if x.state == "serving"]
    target = None
    if demand > 0 and "defrag" in cfg.policies and all(x.free_blocks < demand for x in serving):
        fits = [x for x in serving if x.total_blocks >= demand]
        target = min(fits, default=None, key=lambda x: (-x.free_blocks, x.instance_id))
    pending = {target.instance_id: demand} if target else {}

    def f(x):
        return oracle_freeness(x, cfg, pending.get(x.instance_id, 0))

    def usage(x):
        return oracle_usage(x, cfg, pending.get(x.instance_id, 0))

    assert len(decisions) <= cfg.max_decisions_per_round
    appearances = {}
    for d in decisions:
        appearances[d.source] = appearances.get(d.source, 0) + 1
        appearances[d.destination] = appearances.get(d.destination, 0) + 1
    for iid, n in appearances.items():
        allowed = min(1, max(0, cfg.max_migrations_per_instance - by_id[iid].migrations_in_flight))
        assert n <= allowed, (iid, n, allowed)

    for d in decisions:
        seen[d.reason] = seen.get(d.reason, 0) + 1
        src, dst = by_id[d.source], by_id[d.destination]
        assert src.instance_id != dst.instance_id
        assert dst.state == "serving"
        assert d.reason in cfg.policies and d.request_id == ""
        assert d.selector == ("lowest_priority" if d.reason == "priority" else cfg.selector)
        blocks = oracle_moved_blocks(src, d.reason)
        dst_after = moved(dst, blocks, incoming=True)
        # Destination keeps its watermark and its high-priority headroom free.
        assert dst_after.free_blocks >= oracle_watermark(dst, cfg)
        assert dst_after.free_blocks >= oracle_headroom(dst, cfg)
        assert dst_after.free_blocks >= dst.head_waiting_blocks
        if d.reason == "drain":
            assert src.state == "draining" and src.running + src.waiting > 0
            continue
        assert src.state == "serving" and src.running > 0
        assert f(dst) > f(src)
        assert f(dst_after) >= f(src)           # the destination ends no worse than the source was
        if d.reason == "balance":
            src_after = moved(src, blocks, incoming=False)
            gap = f(dst) - f(src)
            assert gap > cfg.gap_threshold
            assert abs(f(dst_after) - f(src_after)) < abs(gap)
        elif d.reason == "priority":
            assert src.high_priority_running > 0
            assert src.running > src.high_priority_running
            assert src.free_blocks < src.high_priority_running * cfg.high_priority_headroom_blocks
        else:
            assert d.reason == "defrag" and target is not None and src is target

    # Drain never stalls while a free destination with room exists.
    if cfg.policies[0] == "drain":
        drains = [d for d in decisions if d.reason == "drain"]
        if len(drains) < cfg.max_decisions_per_round:
            claimed = {i for d in drains for i in (d.source, d.destination)}
            for src in loads:
                if (src.state != "draining" or src.running + src.waiting == 0
                        or src.migrations_in_flight >= cfg.max_migrations_per_instance
                        or src.instance_id in claimed):
                    continue
                blocks = oracle_moved_blocks(src, "drain")
                open_dsts = [x for x in serving if x.instance_id not in claimed
                             and x.migrations_in_flight < cfg.max_migrations_per_instance
                             and x.total_blocks - usage(x) - blocks >= oracle_watermark(x, cfg)]
                assert open_dsts == [], (src, open_dsts)


def test_random_loads_keep_every_invariant():
    seen: dict[str, int] = {}
    trials_with_decisions = 0
    for seed in range(3000):
        rng = random.Random(seed)
        loads = [random_load(rng, f"i{k:02d}") for k in range(rng.randint(1, 9))]
        cfg = random_config(rng)
        most_free = max((x.free_blocks for x in loads if x.state == "serving"), default=0)
        demand = rng.choice([0, 0, rng.randint(1, 600), most_free + rng.randint(1, 64)])
        decisions = decide(loads, cfg, demand)
        try:
            check_decisions(loads, cfg, demand, decisions, seen)
        except AssertionError as e:
            raise AssertionError(
                f"seed {seed}: {loads} {cfg} demand={demand} -> {decisions}") from e
        shuffled = loads[:]
        rng.shuffle(shuffled)
        assert decide(shuffled, cfg, demand) == decisions, f"seed {seed}: order-dependent"
        assert decide(loads, cfg, demand) == decisions, f"seed {seed}: not deterministic"
        trials_with_decisions += bool(decisions)
    # The generator exercises every policy, so the invariants above are not vacuous.
    assert trials_with_decisions > 1000
    assert all(seen.get(reason, 0) >= 50 for reason in POLICIES), seen


def test_random_uniform_clusters_settle():
    """Balance on clusters of equal-sized requests stops after finitely many rounds, and no
    round lowers the minimum freeness (every instance that moves ends freer than the most
    loaded one of its pair was)."""
    cfg = PolicyConfig(policies=("balance",), gap_threshold=2.0, free_watermark_blocks=0)
    for seed in range(200):
        rng = random.Random(seed)
        size = rng.randint(1, 12)
        cluster = {}
        for k in range(rng.randint(2, 6)):
            total = rng.randint(50, 400)
            n = rng.randint(0, total // size)
            cluster[f"i{k}"] = Inst(f"i{k}", total, [Req(f"i{k}-{j}", size) for j in range(n)])
        lowest = -math.inf
        for _ in range(1000):
            loads = [inst.load() for inst in cluster.values()]
            now = min(freeness(x, cfg) for x in loads)
            assert now >= lowest - 1e-9, f"seed {seed}: min freeness fell from {lowest} to {now}"
            lowest = now
            decisions = decide(loads, cfg)
            if not decisions:
                break
            for d in decisions:
                apply(cluster, d)
        else:
            raise AssertionError(f"seed {seed}: never settled")


# ---------------------------------------------------------------- the grouped search equals the plain scan
def _plain_move_from(rnd, src, reason, selector, moved, accept, beyond=lambda f_dst: False):
    """The definition move_from implements: every serving, available destination but src, freest
    first (ties: instance_id), the first with room that accept() takes."""
    candidates = [d for d in rnd.loads if d.state == "serving" and rnd.available(d)
                  and d.instance_id != src.instance_id and rnd.has_room(d, moved)]
    candidates.sort(key=lambda d: (-rnd.freeness(d), d.instance_id))
    f_src_after = rnd.after_move(src, moved, incoming=False)
    for dst in candidates:
        if accept(rnd.freeness(dst), rnd.after_move(dst, moved, incoming=True), f_src_after):
            rnd.claimed.update((src.instance_id, dst.instance_id))
            rnd.decisions.append(MigrationDecision(src.instance_id, dst.instance_id, reason, selector))
            return


def test_the_grouped_search_decides_what_a_plain_scan_decides(monkeypatch):
    """move_from tries each destination shape once (router/migration/policy.py); on clusters with
    many alike instances (idle ones, copies of one load) and random ones, every round's decisions
    equal those of the plain freest-first scan."""
    from router.migration import policy
    rng = random.Random(2024)
    for trial in range(400):
        n = rng.randint(2, 60)
        base = [random_load(rng, f"b{k}") for k in range(rng.randint(1, 4))]
        loads = []
        for k in range(n):
            if rng.random() < 0.6:                           # a copy of a few shared loads
                loads.append(replaced(rng.choice(base), instance_id=f"i{k:02d}"))
            else:
                loads.append(random_load(rng, f"i{k:02d}"))
        cfg = random_config(rng)
        in_flight = {x.instance_id: rng.randint(0, 2) for x in rng.sample(loads, rng.randint(0, len(loads)))}
        pending = rng.choice([0, 0, rng.randint(1, 500)])
        fast = decide(loads, cfg, pending, in_flight)
        with monkeypatch.context() as m:
            m.setattr(policy._Round, "move_from", _plain_move_from)
            plain = decide(loads, cfg, pending, in_flight)
        assert fast == plain, f"trial {trial}"


def test_migration_groups_are_pools_by_home_role():
    D, C, P = worker_pb2.ROLE_DECODE, worker_pb2.ROLE_COLOCATED, worker_pb2.ROLE_PREFILL
    loads = [load("d0", 50, 1, role=D, home_role=D), load("d1", 50, 1, role=C, home_role=D),   # d1: a standing share
             load("c0", 50, 1, role=C, home_role=C), load("c1", 50, 1, role=C, home_role=C),
             load("p0", 50, 1, role=C, home_role=P),                                          # a prefill instance decoding
             load("x0", 50, 1, role=D)]                                                        # no home reported: its role
    assert [[x.instance_id for x in g] for g in migration_groups(loads)] == [["d0", "d1", "x0"], ["c0", "c1"]]
    assert migration_groups(loads[:1] + loads[2:3]) == []        # a group of one moves nothing
