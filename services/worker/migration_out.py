"""Source side of a live migration: multi-stage pre-copy, then a short stop-and-copy (Llumnix).

    stage 0..k   snapshot the request between two engine steps; copy the blocks written since the
                 previous stage (the partial last block again) while it keeps decoding here
    stop         once at most `stop_copy_blocks` blocks remain: pause it (it keeps its blocks),
                 copy the rest and commit with its output so far; the destination adopts it
    hand off     on the destination's ACK: free it here and end its stream with `migrated`

A request that waits here (preempted: no KV) moves in one stage and recomputes there. Any
failure before the ACK aborts: the request is resumed here, the destination is told to free its
reservation (and frees it by itself when its lease runs out if it cannot be told), and the caller
gets `committed=False` with a reason code:

    dest_refused, dest_oom, dest_busy, dest_unreachable   MigrationStage refused or failed
    transfer_failed                                       the KV transfer failed or timed out
    request_finished, request_preempted                   the request ended or lost its blocks
    too_many_stages                                       pre-copy did not converge
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.engine.blocks import cdiv
from services.engine.engine import MigrationSnapshot
from services.engine.engine_thread import EngineDeadError, EngineThread
from services.proto_convert import sampling_params_to_proto
from services.transport import KVTransportError
from services.worker.migration_in import stage_transfer_id
from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.worker.migration")

SELECTORS = ("shortest", "longest", "lowest_priority")
MOVED_TTL_S = 120.0          # how long Release of a moved request is forwarded to its new owner


class MigrationError(Exception):
    """The migration cannot start (no such request, too many in flight...). `code`: a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class _Abort(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class MigrationConfig:
    stop_copy_blocks: int = 2          # pause and copy the rest once at most this many blocks remain
    max_stages: int = 8                # pre-copy stages before giving up (too_many_stages)
    max_in_flight: int = 1             # outgoing migrations at once
    lease_ms: int = 10_000             # the destination frees the reservation if no stage comes by then
    stage_rpc_timeout_s: float = 10.0
    transfer_timeout_s: float = 30.0
    margin_blocks: int = 4             # reserved beyond the copied KV so later stages rarely need an RPC


@dataclass(frozen=True)
class Moved:
    instance_id: str
    address: str
    next_index: int
    at: float


class MigrationSources:
    """The outgoing migrations of one worker (asyncio loop)."""

    def __init__(self, engine_thread: EngineThread, sender, pool: WorkerPool, instance_id: str, *,
                 block_size: int, config: MigrationConfig):
        self.et, self.sender, self.pool, self.instance_id = engine_thread, sender, pool, instance_id
        self.block_size, self.config = block_size, config
        self.active: dict[str, str] = {}            # request_id → destination instance
        self.moved: dict[str, Moved] = {}           # request_id → where it went (recent)
        self._running: set[asyncio.Task] = set()    # the loop holds tasks weakly
        self.on_event: Callable[..., None] = lambda event, **kw: None   # metrics hook
        # Requests that must stay (the servicer's parked ones: no router would follow them to a
        # destination, and a router that resumes one attaches here).
        self.pinned: Callable[[str], bool] = lambda request_id: False

    def __len__(self) -> int:
        return len(self.active)

    async def _call(self, fn):
        return await asyncio.to_thread(self.et.call, fn)

    async def pick(self, selector: str) -> str:
        """A request to move, chosen by `selector` among those not migrating. Raises MigrationError."""
        if selector not in SELECTORS:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"selector: {selector!r} is not one of {', '.join(SELECTORS)}")
        busy = set(self.active)
        pinned = self.pinned

        def candidates(engine):
            s = engine.scheduler
            return [(r.request_id, r.num_tokens, r.priority) for r in s.running + s.waiting
                    if r.num_output_tokens > 0 and r.request_id not in busy and not pinned(r.request_id)]
        found = await self._call(candidates)
        if not found:
            raise MigrationError(grpc.StatusCode.NOT_FOUND, "no request on this instance can be migrated now")
        key = {"shortest": lambda c: (c[1], c[0]), "longest": lambda c: (-c[1], c[0]),
               "lowest_priority": lambda c: (c[2], c[1], c[0])}[selector]
        return min(found, key=key)[0]

    def moved_to(self, request_id: str) -> Moved | None:
        return self.moved.get(request_id)

    async def migrate(self, request: worker_pb2.MigrateRequest) -> worker_pb2.MigrateResponse:
        """Run one migration to completion. Raises MigrationError when it cannot start; every later
        failure is answered with committed=False and the request running here as before."""
        if not request.destination_address:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT,
                                 "destination_address: is empty; give the destination's gRPC address")
        if request.destination_instance_id == self.instance_id:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT,
                                 "destination_instance_id: is this instance; pick another decode instance")
        rid = request.request_id or await self.pick(request.selector or "shortest")
        if rid in self.active:
            raise MigrationError(grpc.StatusCode.FAILED_PRECONDITION, f"{rid!r} is already migrating")
        if self.pinned(rid):
            raise MigrationError(grpc.StatusCode.FAILED_PRECONDITION, f"{rid!r} is parked (no router reads it): it "
                                 f"stays here until a router takes it back or its grace period ends")
        if len(self.active) >= self.config.max_in_flight:
            raise MigrationError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{len(self.active)} migrations are already leaving this instance; retry later")
        first = await self._call(lambda e: e.migration_snapshot(rid))
        if first is None or first.paused:
            raise MigrationError(grpc.StatusCode.NOT_FOUND, f"request {rid!r} is not running on {self.instance_id}")
        if not first.output_token_ids:
            raise MigrationError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"request {rid!r} has not produced its first token yet; migrate it later")
        self.active[rid] = request.destination_instance_id
        self.on_event("started", reason=request.reason or "manual")
        # Shielded: a caller that goes away (Migrate deadline, router stopping) must not leave the
        # request paused here or half-copied there; the migration commits or aborts on its own.
        task = asyncio.ensure_future(self._run(_Run(self, rid, first, request)))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _run(self, run: "_Run") -> worker_pb2.MigrateResponse:
        try:
            return await run.execute()
        finally:
            del self.active[run.rid]
            self._prune()

    def _prune(self) -> None:
        now = time.monotonic()
        for rid in [r for r, m in self.moved.items() if now - m.at > MOVED_TTL_S]:
            del self.moved[rid]


class _Run:
    """One migration of one request."""

    def __init__(self, owner: MigrationSources, rid: str, first: MigrationSnapshot, request: worker_pb2.MigrateRequest):
        self.o, self.rid, self.first = owner, rid, first
        self.dest_id, self.dest_address = request.destination_instance_id, request.destination_address
        self.stub = owner.pool.stub(request.destination_address)
        self.stage = 0
        self.reserved_blocks = 0
        self.kv_address = ""
        self.blocks_copied = 0
        self.paused = False
        self.recompute = request.recompute
        self.t0 = time.monotonic()

    async def execute(self) -> worker_pb2.MigrateResponse:
        cfg, bs = self.o.config, self.o.block_size
        copied = 0                              # KV positions [0, copied) are on the destination
        try:
            snap = self.first
            while not self.recompute:           # pre-copy while the request keeps decoding
                if not snap.running:
                    break                       # waiting here: nothing to copy, one stage
                remaining = cdiv(snap.num_computed_tokens, bs) - copied // bs
                if remaining <= cfg.stop_copy_blocks:
                    break
                if self.stage >= cfg.max_stages:
                    raise _Abort("too_many_stages", f"{remaining} blocks still to copy after {self.stage} stages")
                await self._copy(snap, copied, final=False)
                copied = snap.num_computed_tokens
                self.stage += 1
                snap = await self._snapshot()
            snap = await self.o._call(lambda e: e.pause(self.rid))
            t_pause = time.monotonic()
            if snap is None:
                raise _Abort("request_finished", f"{self.rid!r} finished before the stop-and-copy")
            self.paused = True
            self._check(snap)
            await self._copy(snap, copied, final=True)
            t_ack = time.monotonic()
        except _Abort as e:
            return await self._aborted(e)
        next_index = len(snap.output_token_ids)
        self.o.moved[self.rid] = Moved(self.dest_id, self.dest_address, next_index, time.monotonic())
        try:
            await asyncio.to_thread(self.o.et.hand_off, self.rid)     # ends the local stream with `migrated`
        except EngineDeadError:
            pass
        downtime, total = t_ack - t_pause, time.monotonic() - self.t0
        self.o.on_event("committed", downtime_s=downtime, stages=self.stage + 1)
        log.info("migrated %s to %s: %d stages, %d blocks, downtime %.1f ms, total %.1f ms", self.rid, self.dest_id,
                 self.stage + 1, self.blocks_copied, downtime * 1e3, total * 1e3)
        return worker_pb2.MigrateResponse(request_id=self.rid, committed=True, stages=self.stage + 1,
                                          blocks_copied=self.blocks_copied, downtime_s=downtime, total_s=total,
                                          next_index=next_index)

    async def _snapshot(self) -> MigrationSnapshot:
        snap = await self.o._call(lambda e: e.migration_snapshot(self.rid))
        if snap is None:
            raise _Abort("request_finished", f"{self.rid!r} finished or was cancelled during the migration")
        self._check(snap)
        return snap

    def _check(self, snap: MigrationSnapshot) -> None:
        if snap.num_preemptions != self.first.num_preemptions:
            raise _Abort("request_preempted", f"{self.rid!r} was preempted here; its copied KV is void")

    async def _copy(self, snap: MigrationSnapshot, copied: int, final: bool) -> None:
        """One stage: make the destination expect it (RPC only when needed), push the blocks written
        since `copied`, commit. Raises _Abort."""
        cfg, bs = self.o.config, self.o.block_size
        with_kv = snap.running and not self.recompute
        n = snap.num_computed_tokens if with_kv else 0
        end_block = cdiv(n, bs)
        if self.stage == 0 or end_block > self.reserved_blocks:
            await self._stage_rpc(snap, n + (0 if final else cfg.margin_blocks * bs))
        first_block = copied // bs if with_kv else 0
        src = snap.block_table[first_block:end_block]
        meta = {"final": final}
        if final:
            meta.update(recompute=not with_kv, output_token_ids=snap.output_token_ids,
                        output_logprobs=[None if math.isnan(x) else x for x in snap.output_logprobs])
        transfer = None
        try:
            transfer = await asyncio.to_thread(self.o.sender.open, stage_transfer_id(self.rid, self.stage),
                                               self.kv_address, self.o.et.engine.runner.kv)
            if src:
                transfer.push(src, first_block, 0, self.o.et.engine.runner.kv.shape[1])
            await asyncio.to_thread(transfer.commit, n, meta, cfg.transfer_timeout_s)
        except (KVTransportError, ValueError) as e:
            if transfer is not None:
                transfer.abort(str(e))
            raise _Abort("transfer_failed", f"stage {self.stage} to {self.dest_id}: {e}") from e
        self.blocks_copied += len(src)

    async def _stage_rpc(self, snap: MigrationSnapshot, num_tokens: int) -> None:
        req = worker_pb2.MigrationStageRequest(request_id=self.rid, stage=self.stage, num_tokens=num_tokens,
                                               source_instance_id=self.o.instance_id,
                                               lease_ms=self.o.config.lease_ms)
        if self.stage == 0:
            req.request.CopyFrom(worker_pb2.WorkerRequest(
                request_id=self.rid, prompt_token_ids=snap.prompt_token_ids,
                params=sampling_params_to_proto(snap.params), priority=snap.priority))
        try:
            resp = await self.stub.MigrationStage(req, timeout=self.o.config.stage_rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            reason = {grpc.StatusCode.RESOURCE_EXHAUSTED: "dest_oom", grpc.StatusCode.UNAVAILABLE: "dest_unreachable",
                      grpc.StatusCode.DEADLINE_EXCEEDED: "dest_unreachable"}.get(e.code(), "dest_refused")
            if reason == "dest_oom" and "migrations are already" in (e.details() or ""):
                reason = "dest_busy"
            raise _Abort(reason, f"{self.dest_id} answered {e.code().name}: {e.details()}") from e
        self.reserved_blocks, self.kv_address = resp.num_blocks, resp.kv_address

    async def _aborted(self, e: _Abort) -> worker_pb2.MigrateResponse:
        if self.paused:
            try:
                await self.o._call(lambda eng: eng.resume(self.rid))
            except EngineDeadError:
                pass
        if self.reserved_blocks or self.stage > 0 or e.reason not in ("dest_oom", "dest_refused", "dest_busy"):
            try:          # best effort: the destination's lease frees the blocks if this does not arrive
                await self.stub.CancelMigration(worker_pb2.CancelMigrationRequest(
                    request_id=self.rid, reason=f"{e.reason}: {e}"), timeout=5.0)
            except grpc.aio.AioRpcError:
                pass
        self.o.on_event("aborted", reason=e.reason)
        log.info("migration of %s to %s aborted (%s): %s", self.rid, self.dest_id, e.reason, e)
        return worker_pb2.MigrateResponse(request_id=self.rid, committed=False, abort_reason=e.reason, message=str(e),
                                          stages=self.stage, blocks_copied=self.blocks_copied,
                                          total_s=time.monotonic() - self.t0)
