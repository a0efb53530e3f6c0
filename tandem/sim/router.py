"""The simulated router: Tandem's own placement, role switching and rescheduling policies, imported
(router/request/placement.py, router/cluster/role_policy.py, router/migration/policy.py), driving SimInstances.

Request path, as router/request/dispatch.py runs it:
1. Adaptive pools with a switched instance: `pick_whole_request` may take the request whole.
2. Prefill and decode pools: `pick_decode` (freeness) reserves the prompt's KV blocks on D, then
   `pick_prefill` (least predicted TTFT) queues the prompt on P with a handoff. At P's first token
   the KV's last layer group crosses (the rest streamed during the prefill); the first token reaches
   the client then, and D adopts the request for its next step; P frees its blocks.
3. Colocated pool only: `pick_colocated` (freeness).
No instance with room: the request waits (its need published as demand for the rescheduler's
de-fragmentation) and is placed again when blocks free, failing after queue_timeout_s.

Every `role_interval_s` (adaptive pools) role_policy.decide may switch one instance; every
`reschedule_interval_s` migration_policy.decide may migrate requests between decode-capable
instances: pre-copy stages while the request decodes on, then stop-and-copy of the last blocks
(the request pauses at a step boundary), then the destination adopts it.
Loads are read live (no report staleness), so the in-flight ledger stays empty.
"""
from __future__ import annotations

import dataclasses
import itertools

from router.migration import policy as migration_policy
from router.request import placement
from router.cluster import role_policy
from router.settings import RESCHEDULE_INTERVAL_S
from services.roles import WorkerState
from tandem.sim.clock import EventLoop
from tandem.sim.costmodel import CostModel
from tandem.sim.instance import COLOCATED, DECODE, PREFILL, SimInstance, blocks_for
from tandem.sim.request import SimRequest

DISPATCH = ("load", "round_robin")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    pools: str = "fixed"                              # fixed | adaptive
    dispatch: str = "load"                            # load (Tandem's placement) | round_robin
    migration: bool = True
    role_policy: role_policy.RolePolicyConfig = role_policy.RolePolicyConfig()
    migration_policy: migration_policy.PolicyConfig = migration_policy.PolicyConfig()
    reschedule_interval_s: float = RESCHEDULE_INTERVAL_S
    role_interval_s: float = 0.25
    queue_timeout_s: float = 10.0
    stop_copy_blocks: int = 2
    max_stages: int = 8
    sample_interval_s: float = 0.0                    # > 0: sample queueing and fragmentation this often


class SimRouter:
    def __init__(self, loop: EventLoop, cost: CostModel, instances: list[SimInstance], config: RouterConfig,
                 kv_tail_fraction: float = 1.0):
        self.loop, self.cost, self.config = loop, cost, config
        self.instances = instances
        self.kv_tail_fraction = kv_tail_fraction
        self.ledger = placement.InflightLedger()             # stays empty: loads are live
        self.queue: list[tuple[SimRequest, int]] = []        # (request, blocks needed) waiting for room
        self.reserved: dict[int, tuple[SimInstance, int]] = {}   # request index → (D, blocks)
        self.last_switch: dict[str, float] = {}
        self.role_switches = 0
        self.migrations = {"started": 0, "committed": 0, "aborted": 0}
        self._rr = itertools.count()
        self.live = 0
        self._sleeping: set[str] = set()
        for inst in instances:
            inst.on_handoff, inst.on_free, inst.on_finish = self._handed_off, self._freed, self._finished
        if config.pools == "adaptive":
            loop.after(config.role_interval_s, self._role_round)
        if config.migration:
            loop.after(config.reschedule_interval_s, self._reschedule_round)
        self.samples = {"n": 0, "queued": 0, "fragmented": 0}
        if config.sample_interval_s > 0:
            loop.after(config.sample_interval_s, self._sample)

    # ---- placement ---------------------------------------------------------------------------
    def submit(self, r: SimRequest) -> None:
        self.live += 1
        if self._sleeping:
            self._wake()
        if not self._place(r):
            self.queue.append((r, blocks_for(r.prompt, self._bs)))
            self.loop.after(self.config.queue_timeout_s, self._queue_timeout, r)

    @property
    def _bs(self) -> int:
        return self.instances[0].block_size

    def _pools(self):
        serving = [i for i in self.instances if i.state == WorkerState.SERVING]
        prefill = [i for i in serving if placement.serves(i, PREFILL)]
        decode = [i for i in serving if placement.serves(i, DECODE)]
        baseline = [i for i in serving if i.role == COLOCATED and i.home_role not in (PREFILL, DECODE)]
        return prefill, decode, baseline

    def _place(self, r: SimRequest) -> bool:
        need = blocks_for(r.prompt, self._bs)
        if self.config.pools == "adaptive" and any(i.role == COLOCATED and i.home_role != COLOCATED
                                                   for i in self.instances):
            whole = placement.pick_whole_request(self.instances, r.prompt, need, self.ledger)
            if whole is not None:
                whole.enqueue(r, handoff=False)
                return True
        prefill, decode, baseline = self._pools()
        if prefill and decode:
            d = self._pick(decode, need, placement.pick_decode)
            if d is None or not d.reserve(need):
                return False
            self.reserved[r.index] = (d, need)
            p = self._pick_prefill(prefill, r.prompt)
            p.enqueue(r, handoff=True)
            return True
        c = self._pick(baseline, need, placement.pick_colocated)
        if c is None:
            return False
        c.enqueue(r, handoff=False)
        return True

    def _pick(self, pool: list[SimInstance], need: int, pick) -> SimInstance | None:
        if self.config.dispatch == "round_robin":
            start = next(self._rr)
            for j in range(len(pool)):
                inst = pool[(start + j) % len(pool)]
                if inst.free_blocks >= need:
                    return inst
            return None
        return pick(pool, need, self.ledger)

    def _pick_prefill(self, pool: list[SimInstance], prompt: int) -> SimInstance:
        if self.config.dispatch == "round_robin":
            return pool[next(self._rr) % len(pool)]
        return placement.pick_prefill(pool, prompt, self.ledger)

    def _freed(self, _inst: SimInstance) -> None:
        while self.queue:
            r, _ = self.queue[0]
            if not self._place(r):
                return
            self.queue.pop(0)

    def _queue_timeout(self, r: SimRequest) -> None:
        for j, (q, _) in enumerate(self.queue):
            if q is r:
                del self.queue[j]
                r.fail(self.loop.now, "RESOURCE_EXHAUSTED: every instance is full; retry later")
                self.live -= 1
                return

    def pending_demand_blocks(self) -> int:
        return max((need for _, need in self.queue), default=0)

    def _sample(self) -> None:
        """Queued requests, and those of them (Llumnix's fragmentation) that the free KV blocks of
        all instances together would hold though none holds them alone."""
        free = sum(i.free_blocks for i in self.instances if i.state == WorkerState.SERVING)
        needs = [need for _, need in self.queue]
        for inst in self.instances:
            needs += [blocks_for(r.num_tokens, inst.block_size) - r.blocks for r in inst.wait_q]
        self.samples["n"] += 1
        self.samples["queued"] += len(needs)
        self.samples["fragmented"] += sum(need <= free for need in needs)
        if self.live or self.queue:
            self.loop.after(self.config.sample_interval_s, self._sample)
        else:
            self._idle_timer("_sample", self.config.sample_interval_s)

    def fragmentation(self) -> dict | None:
        n = self.samples["n"]
        if not n:
            return None
        return {"mean_queued": self.samples["queued"] / n, "mean_fragmented": self.samples["fragmented"] / n,
                "samples": n}

    # ---- the disaggregated hand-off -------------------------------------------------------------
    def _handed_off(self, p: SimInstance, r: SimRequest) -> None:
        d, need = self.reserved.pop(r.index)
        tail = self.cost.transfer_s(r.blocks * self.cost.kv_bytes_per_block * self.kv_tail_fraction)
        self.loop.after(tail, self._transferred, p, d, r, need)

    def _transferred(self, p: SimInstance, d: SimInstance, r: SimRequest, need: int) -> None:
        p.release(r)
        r.emit(self.loop.now + p.path_s, 1)
        if r.done:
            d.unreserve(need)
            r.finish(self.loop.now + p.path_s)
            self.live -= 1
            return
        d.adopt(r, need)

    def _finished(self, _inst: SimInstance, _r: SimRequest) -> None:
        self.live -= 1

    # ---- adaptive pools --------------------------------------------------------------------------
    def _role_round(self) -> None:
        now = self.loop.now
        home = {i.instance_id: i.home_role for i in self.instances}
        d = role_policy.decide(self.instances, home, self.last_switch, now, self.config.role_policy)
        if d is not None:
            inst = next(i for i in self.instances if i.instance_id == d.instance_id)
            self.role_switches += d.role != inst.role       # the same role: a new cap (role_policy rule 4)
            inst.set_role(d.role, d.mixed_prefill_tokens)
            self.last_switch[d.instance_id] = now
        if self.live or self.queue:
            self.loop.after(self.config.role_interval_s, self._role_round)
        else:
            self._idle_timer("_role_round", self.config.role_interval_s)

    # ---- rescheduling ----------------------------------------------------------------------------
    def _reschedule_round(self) -> None:
        serving = [i for i in self.instances if i.state == WorkerState.SERVING]
        for group in migration_policy.migration_groups(serving):       # as the rescheduler groups them
            if any(i.run_q for i in group):
                by_id = {i.instance_id: i for i in group}
                for dec in migration_policy.decide(group, self.config.migration_policy, self.pending_demand_blocks()):
                    self._migrate(by_id[dec.source], by_id[dec.destination], dec.selector)
        if self.live or self.queue:
            self.loop.after(self.config.reschedule_interval_s, self._reschedule_round)
        else:
            self._idle_timer("_reschedule_round", self.config.reschedule_interval_s)

    def _idle_timer(self, name: str, interval: float) -> None:
        """Nothing to watch: the round resumes at the next submit (_wake), so an idle cluster costs no events."""
        self._sleeping.add(name)

    def _wake(self) -> None:
        intervals = {"_role_round": self.config.role_interval_s, "_sample": self.config.sample_interval_s,
                     "_reschedule_round": self.config.reschedule_interval_s}
        for name in sorted(self._sleeping):
            self.loop.after(intervals[name], getattr(self, name))
        self._sleeping.clear()

    def _migrate(self, src: SimInstance, dst: SimInstance, selector: str) -> None:
        cands = [r for r in src.run_q if r.out > 0 and not r.migrating and not r.handoff and r.pause_cb is None]
        if not cands:
            return
        key = {"shortest": lambda r: (r.num_tokens, r.request_id), "longest": lambda r: (-r.num_tokens, r.request_id),
               "lowest_priority": lambda r: (r.priority, r.num_tokens, r.request_id)}[selector]
        r = min(cands, key=key)
        need = blocks_for(r.num_tokens + 1, src.block_size)
        if not dst.reserve(need):
            return
        r.migrating = True
        src.migrations_in_flight += 1
        dst.migrations_in_flight += 1
        self.migrations["started"] += 1
        self._stage(src, dst, r, need, copied=0, stage=1)

    def _stage(self, src: SimInstance, dst: SimInstance, r: SimRequest, need: int, copied: int, stage: int) -> None:
        """One pre-copy stage: the blocks added since the last one, while r decodes on."""
        if r not in src.run_q:                       # finished (or preempted) meanwhile: abort
            self._end_migration(src, dst, r, need, committed=False)
            return
        todo = r.blocks - copied
        if todo <= self.config.stop_copy_blocks or stage > self.config.max_stages:
            src.pause(r, lambda r: self._stop_and_copy(src, dst, r, need))
            return
        dt = self.cost.migration_stage_s + self.cost.transfer_s(todo * self.cost.kv_bytes_per_block) \
            - self.cost.transfer_latency_s
        self.loop.after(dt, self._stage, src, dst, r, need, r.blocks, stage + 1)

    def _stop_and_copy(self, src: SimInstance, dst: SimInstance, r: SimRequest, need: int) -> None:
        if r.done or r.blocks == 0:                  # finished or preempted before the pause: abort
            self._end_migration(src, dst, r, need, committed=False)
            return
        grown = blocks_for(r.num_tokens, src.block_size)
        if grown > need and not dst.reserve(grown - need):
            src.run_q.append(r)                      # resume on the source
            src.poke()
            self._end_migration(src, dst, r, need, committed=False)
            return
        need = max(need, grown)
        dt = self.cost.migration_stage_s + self.cost.transfer_s(self.config.stop_copy_blocks * self.cost.kv_bytes_per_block)
        self.loop.after(dt, self._commit, src, dst, r, need)

    def _commit(self, src: SimInstance, dst: SimInstance, r: SimRequest, need: int) -> None:
        src.release(r)
        dst.adopt(r, need)
        self._end_migration(src, dst, r, need, committed=True)

    def _end_migration(self, src, dst, r, need, committed: bool) -> None:
        r.migrating = False
        src.migrations_in_flight -= 1
        dst.migrations_in_flight -= 1
        self.migrations["committed" if committed else "aborted"] += 1
        if not committed:
            dst.unreserve(need)
