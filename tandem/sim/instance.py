"""A simulated instance: the engine scheduler's batching rules over counters, timed by a cost model.

Mirrors services/engine/scheduler.py step for step — decodes first (one token each), then chunks of
running prefills, then waiting requests admitted in the engine policy's order while the token budget
(max_num_batched_tokens), max_num_seqs and free KV blocks last; beside decodes, prompt chunks take at
most mixed_prefill_tokens (adaptive pools' cap); when a decode cannot get a block the policy's victim
is preempted and recomputes. The queue order and preemption victim come from the engine's own
policy object (services/engine/policy.make_policy, on the virtual clock: tandem/sim/queue.py).

Fast-forward: a step that schedules only decodes (no prefill, no preemption) repeats unchanged until
a request finishes, blocks run short or new work arrives, so it is run as one segment of k steps
whose end is computed in closed form (CostModel.decode_run_s). New work (`poke`) cuts the segment
after the step in flight, as the real engine takes new work at the next step. Output tokens of a
segment are recorded as one message of k tokens at its end (first and last token times, hence TTFT
and TPOT, are exact; ITL within a segment is its mean).

The attributes placement and role_policy read (instance_id, role, home_role, state, free_blocks,
total_blocks, running, waiting, queued_prefill_tokens, step_time_ms, decode_step_time_ms,
prefill_tokens_per_s, mixed_prefill_tokens, block_size, updated_unix_ms) are live, so an instance is its own LoadReport.
"""
from __future__ import annotations

from collections.abc import Callable

from services.engine.blocks import cdiv
from services.roles import Role, WorkerState
from tandem.sim.clock import EventLoop, Timer
from tandem.sim.costmodel import CostModel
from tandem.sim.queue import VirtualClockPolicy
from tandem.sim.request import SimRequest

PREFILL, DECODE, COLOCATED = Role.PREFILL, Role.DECODE, Role.COLOCATED


def blocks_for(tokens: int, block_size: int) -> int:
    return cdiv(tokens, block_size)


class SimInstance:
    def __init__(self, loop: EventLoop, cost: CostModel, instance_id: str, role: int, *, num_blocks: int,
                 block_size: int = 16, max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                 policy: str = "fcfs", path_s: float = 0.0,
                 on_handoff: Callable[["SimInstance", SimRequest], None] | None = None,
                 on_finish: Callable[["SimInstance", SimRequest], None] | None = None,
                 on_free: Callable[["SimInstance"], None] | None = None):
        self.loop, self.cost = loop, cost
        self.instance_id, self.role, self.home_role, self.state = instance_id, role, role, WorkerState.SERVING
        self.total_blocks = self.free_blocks = num_blocks
        self.block_size, self.max_num_batched_tokens, self.max_num_seqs = block_size, max_num_batched_tokens, max_num_seqs
        self.policy = VirtualClockPolicy(policy, lambda: loop.now)
        self.mixed_prefill_tokens = 0
        self.path_s = path_s
        self.on_handoff, self.on_finish, self.on_free = on_handoff, on_finish, on_free
        self.run_q: list[SimRequest] = []
        self.wait_q: list[SimRequest] = []
        self.queued_prefill_tokens = 0
        self.step_time_ms = 0.0
        self.decode_step_time_ms = 0.0     # steps without prompt tokens (services/engine/step_rates.py)
        self.prefill_tokens_per_s = 0.0
        self.updated_unix_ms = 0
        self.migrations_in_flight = 0
        self.head_waiting_blocks = 0
        self.steps = 0
        self.busy_s = 0.0
        self.preemptions = 0
        # the segment in flight: (start, decodes, k, context at start, end timer) or None when idle
        self._seg: tuple[float, list[SimRequest], int, int, Timer] | None = None
        self._step: tuple[list[tuple[SimRequest, int]], list[SimRequest], Timer] | None = None

    # ---- what a LoadReport states ------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.run_q)

    @property
    def waiting(self) -> int:
        return len(self.wait_q)

    high_priority_running = high_priority_blocks = 0

    # ---- work in ------------------------------------------------------------------------------
    def reserve(self, blocks: int) -> bool:
        """Hold `blocks` for KV arriving later (a decode reservation); False when short."""
        if blocks > self.free_blocks:
            return False
        self.free_blocks -= blocks
        return True

    def unreserve(self, blocks: int) -> None:
        self.free_blocks += blocks
        self._freed()

    def enqueue(self, r: SimRequest, handoff: bool) -> None:
        """A new request (or one to recompute): it waits for admission."""
        r.handoff, r.computed, r.blocks = handoff, 0, 0
        self.wait_q.append(r)
        self.queued_prefill_tokens += r.num_tokens
        self.poke()

    def adopt(self, r: SimRequest, reserved_blocks: int) -> None:
        """A request whose KV arrived (prompt + out − 1 tokens computed) in `reserved_blocks`: it
        decodes from the next step."""
        r.handoff, r.computed, r.blocks = False, r.num_tokens - 1, reserved_blocks
        self.run_q.append(r)
        self.poke()

    def release(self, r: SimRequest) -> None:
        """Free what r holds here (after a handoff's transfer or a migration's commit)."""
        self.free_blocks += r.blocks
        r.blocks = 0
        self._freed()

    def _freed(self) -> None:
        """Blocks came back outside a step: a head of line waiting for them may go now."""
        if self.wait_q:
            self.poke()
        if self.on_free:
            self.on_free(self)

    def pause(self, r: SimRequest, cb: Callable[[SimRequest], None]) -> None:
        """Take r out of scheduling at the next step boundary (keeping its blocks), then cb(r)."""
        r.pause_cb = cb
        self.poke()

    def set_role(self, role: int, mixed_prefill_tokens: int) -> None:
        self.role, self.mixed_prefill_tokens = role, mixed_prefill_tokens
        self.poke()

    def poke(self) -> None:
        """New work: start a step now when idle; cut a decode segment after its step in flight.
        Inside a step's end or a schedule (callbacks there may bring work back here) it is noted
        and done once that is over."""
        if self._guard:
            self._pending = True
            return
        if self._step is None and self._seg is None:
            self._schedule()
            return
        if self._seg is not None:
            t0, decodes, k, ctx, timer = self._seg
            done = self.cost.decode_steps_done(self.loop.now - t0, len(decodes), ctx, k)
            keep = min(k, done + 1)
            if keep < k:
                timer.cancel()
                self._release_excess(decodes, k, keep)
                end = t0 + self.cost.decode_run_s(keep, len(decodes), ctx)
                self._seg = (t0, decodes, keep, ctx, self.loop.at(end, self._end_segment))

    # ---- one step ----------------------------------------------------------------------------
    _guard = False
    _pending = False

    def _schedule(self) -> None:
        self._guard = True
        try:
            self._schedule_once()
        finally:
            self._guard = False
        if self._pending:
            self._pending = False
            self.poke()

    def _schedule_once(self) -> None:
        for r in [r for r in self.run_q if r.pause_cb is not None]:
            self.run_q.remove(r)
            cb, r.pause_cb = r.pause_cb, None
            cb(r)
        budget = self.max_num_batched_tokens
        decodes: list[SimRequest] = []
        chunks: list[tuple[SimRequest, int]] = []
        self._gone: set[int] = set()
        preempted = self._displace_for_shorter()
        key = self.policy.key
        for r in sorted(self.run_q, key=lambda r: (not r.is_decode, key(r))):
            if budget <= 0:
                break
            if id(r) in self._gone:            # preempted earlier in this loop
                continue
            decode = r.is_decode
            n = self._wanted(r, budget if decode else self._prefill_budget(decodes, chunks, budget))
            if n <= 0:
                continue
            if not self._reserve_or_preempt(r, n, decodes, chunks):
                preempted = True
                continue
            (decodes.append(r) if decode and n == 1 else chunks.append((r, n)))
            budget -= n
        if self.wait_q and not self._preempted_now:
            self._admit(decodes, chunks, self._prefill_budget(decodes, chunks, budget))
        preempted = preempted or self._preempted_now
        self._preempted_now = False
        self._update_head_waiting()
        if not decodes and not chunks:
            return                              # idle until poked
        now = self.loop.now
        if not chunks and not preempted:
            ctx = sum(r.computed for r in decodes) + len(decodes)     # attention over prompt + output
            k = self._segment_steps(decodes)
            end = now + self.cost.decode_run_s(k, len(decodes), ctx)
            self._seg = (now, decodes, k, ctx, self.loop.at(end, self._end_segment))
            return
        ctx = sum(r.computed for r in decodes) + len(decodes)
        dt = self.cost.step_s([(n, r.computed) for r, n in chunks], len(decodes), ctx)
        self._step = (chunks, decodes, self.loop.at(now + dt, self._end_step, dt))

    _preempted_now = False
    _gone: set[int] = frozenset()

    def _displace_for_shorter(self) -> bool:
        """The engine scheduler's displacement (Scheduler._displace_for_shorter, the same policy
        method): with every slot taken, sjf may give one to a much shorter waiting request; the
        victim recomputes (the simulator keeps no compressed KV). True when one was displaced."""
        if not self.policy.displace_ratio or len(self.run_q) < self.max_num_seqs or not self.wait_q:
            return False
        head = min(self.wait_q, key=self.policy.key)
        victim = self.policy.displacement_victim(head, [r for r in self.run_q if r.out > 0], lambda r: False)
        if victim is None:
            return False
        victim.num_displaced += 1
        self._preempt(victim)
        self._preempted_now = False          # a slot, not blocks, was short: admission goes on
        return True

    def _wanted(self, r: SimRequest, budget: int) -> int:
        if r.handoff and r.out > 0:
            return 0
        return min(r.num_tokens - r.computed, budget)

    def _prefill_budget(self, decodes, chunks, budget: int) -> int:
        if not (self.mixed_prefill_tokens and decodes):
            return budget
        return min(budget, max(0, self.mixed_prefill_tokens - sum(n for _, n in chunks)))

    def _grow(self, r: SimRequest, tokens: int) -> bool:
        need = blocks_for(tokens, self.block_size) - r.blocks
        if need > self.free_blocks:
            return False
        if need > 0:
            self.free_blocks -= need
            r.blocks += need
        return True

    def _reserve_or_preempt(self, r: SimRequest, n: int, decodes, chunks) -> bool:
        if self._grow(r, r.computed + n):
            return True
        scheduled = {id(x) for x in decodes} | {id(x) for x, _ in chunks}
        while not self._grow(r, r.computed + n):
            victim = self.policy.preemption_victim([x for x in self.run_q if id(x) not in scheduled])
            self._preempt(victim)
            if victim is r:
                return False
        return True

    def _preempt(self, r: SimRequest) -> None:
        self.run_q.remove(r)
        self._gone.add(id(r))
        self.free_blocks += r.blocks
        # all its tokens are to compute again: a decode added none to the queue, a prefill its rest
        self.queued_prefill_tokens += r.num_tokens if r.is_decode else r.computed
        r.blocks, r.computed = 0, 0
        self.wait_q.append(r)
        self._preempted_now = True
        self.preemptions += 1
        self._paused_elsewhere(r)

    @staticmethod
    def _paused_elsewhere(r: SimRequest) -> None:
        """A pause asked for r that will never reach a step boundary here (it finished or was
        preempted): tell the asker now (it sees r.done or r.blocks == 0 and aborts)."""
        if r.pause_cb is not None:
            cb, r.pause_cb = r.pause_cb, None
            cb(r)

    def _admit(self, decodes, chunks, budget: int) -> None:
        for r in self.policy.admission_order(self.wait_q):
            if budget <= 0 or len(self.run_q) >= self.max_num_seqs:
                break
            n = self._wanted(r, budget)
            if not self._grow(r, r.computed + n):
                break                                    # head of line waits for blocks
            self.wait_q.remove(r)
            self.run_q.append(r)
            chunks.append((r, n))
            budget -= n

    def _update_head_waiting(self) -> None:
        if not self.wait_q:
            self.head_waiting_blocks = 0
            return
        head = self.policy.admission_order(self.wait_q)[0] if len(self.wait_q) > 1 else self.wait_q[0]
        self.head_waiting_blocks = max(0, blocks_for(head.num_tokens, self.block_size) - head.blocks)

    def _segment_steps(self, decodes: list[SimRequest]) -> int:
        """Steps the decode-only batch repeats: until the first finishes, capped by free blocks
        (blocks for step 1 are already held; the rest are taken now, returned if cut short)."""
        k = min(r.max_tokens - r.out for r in decodes)
        bs = self.block_size

        def extra(steps: int) -> int:
            return sum(max(0, blocks_for(r.computed + steps, bs) - r.blocks) for r in decodes)
        if extra(k) > self.free_blocks:
            lo, hi = 1, k                              # extra(lo) == 0 ≤ free; extra(hi) > free
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if extra(mid) <= self.free_blocks else (lo, mid)
            k = lo
        for r in decodes:
            self._grow(r, r.computed + k)
        return k

    def _release_excess(self, decodes: list[SimRequest], k: int, keep: int) -> None:
        bs = self.block_size
        for r in decodes:
            excess = r.blocks - blocks_for(r.computed + keep, bs)
            if excess > 0:
                r.blocks -= excess
                self.free_blocks += excess

    def _observe(self, step_s: float, steps: int, prefill_tokens: int) -> None:
        w = 1 - 0.8 ** steps
        ms = step_s / steps * 1e3
        self.step_time_ms = self.step_time_ms + w * (ms - self.step_time_ms) if self.step_time_ms else ms
        if not prefill_tokens:
            d = self.decode_step_time_ms
            self.decode_step_time_ms = d + w * (ms - d) if d else ms
        if prefill_tokens:
            rate = prefill_tokens / step_s
            self.prefill_tokens_per_s = 0.8 * self.prefill_tokens_per_s + 0.2 * rate if self.prefill_tokens_per_s \
                else rate
        self.steps += steps
        self.busy_s += step_s
        self.updated_unix_ms = int(self.loop.now * 1e3)

    def _end_segment(self) -> None:
        t0, decodes, k, ctx, _ = self._seg
        self._seg = None
        self._guard = True
        now = self.loop.now
        self._observe(now - t0, k, 0)
        for r in decodes:
            r.computed += k
            r.out += k
            r.emit(now + self.path_s, k)
            if r.done:
                self._finish(r)
        self._guard = False
        self._schedule()

    def _end_step(self, dt: float) -> None:
        chunks, decodes, _ = self._step
        self._step = None
        self._guard = True
        now = self.loop.now
        prefill_tokens = sum(n for _, n in chunks)
        self.queued_prefill_tokens -= prefill_tokens
        self._observe(dt, 1, prefill_tokens)
        for r, n in chunks + [(r, 1) for r in decodes]:
            r.computed += n
            if r.computed != r.num_tokens:
                continue
            r.out += 1
            if r.handoff:
                self.run_q.remove(r)
                self.on_handoff(self, r)         # the router emits the first token after the transfer
                continue
            r.emit(now + self.path_s, 1)
            if r.done:
                self._finish(r)
        self._schedule()

    def _finish(self, r: SimRequest) -> None:
        self.run_q.remove(r)
        self.free_blocks += r.blocks
        r.blocks = 0
        r.finish(self.loop.now + self.path_s)
        self._paused_elsewhere(r)
        if self.on_finish:
            self.on_finish(self, r)
        if self.on_free:
            self.on_free(self)

    def check_integrity(self, idle: bool = False) -> None:
        """Raises AssertionError unless the blocks queued requests hold fit the pool and the queued
        prompt tokens add up; with idle=True (the run is over) every block must be free again."""
        held = sum(r.blocks for r in self.run_q) + sum(r.blocks for r in self.wait_q)
        if self.free_blocks < 0 or held > self.total_blocks - self.free_blocks:
            raise AssertionError(f"{self.instance_id}: free {self.free_blocks}, held {held}, total {self.total_blocks}")
        queued = sum(r.num_tokens - r.computed for r in self.wait_q) + sum(
            r.num_tokens - r.computed for r in self.run_q if not r.is_decode and not (r.handoff and r.out))
        if queued != self.queued_prefill_tokens:
            raise AssertionError(f"{self.instance_id}: queued prefill tokens {self.queued_prefill_tokens} != {queued}")
        if idle and (self.free_blocks != self.total_blocks or self.run_q or self.wait_q):
            raise AssertionError(f"{self.instance_id}: {self.total_blocks - self.free_blocks} blocks still held, "
                                 f"{len(self.run_q)} running, {len(self.wait_q)} waiting after the run")
