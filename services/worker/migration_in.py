"""Destination side of a live migration: a reservation that grows stage by stage, then adoption.

The source drives (see migration_out.py). Before copy stage k it calls MigrationStage(k): stage 0
reserves blocks for the request (refused when that would leave fewer than the free-block
watermark, when this instance is draining, or when too many migrations are in flight), later
stages grow the reservation. Each stage's KV arrives as the data-plane transfer
"<request_id>#m<k>", written straight into the reserved blocks at their logical positions. A
non-final stage's commit only acknowledges (and expects stage k+1 into the same blocks, so the
source may skip the RPC when the reservation already covers it). The final commit carries the
request's output so far: the request is adopted into the engine and registered as an adopted
lease, so the router's Decode(request_id, next_index) claims it like any other.

Every way out frees the reservation: CancelMigration from the source, the deadline (renewed by
every stage; it fires when the source vanished), the instance stopping. After a release the
receiver has forgotten every stage transfer, so no byte lands in freed blocks.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.engine.blocks import cdiv
from services.engine.engine_thread import EngineDeadError, EngineThread
from services.engine.sampling_params import SamplingParams
from services.worker.async_stream import AsyncRequestStream
from services.worker.leases import Lease, LeaseTable

log = logging.getLogger("tandem.worker.migration")


class MigrationRefused(Exception):
    """MigrationStage cannot proceed. `code` is a grpc.StatusCode name; `reason` a metrics label."""

    def __init__(self, code: str, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason = code, reason


def stage_transfer_id(request_id: str, stage: int) -> str:
    return f"{request_id}#m{stage}"


@dataclass
class IncomingMigration:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    source_instance_id: str
    loop: asyncio.AbstractEventLoop
    lease_s: float
    block_ids: list[int] = field(default_factory=list)
    stage: int = 0                        # the stage whose transfer the receiver expects now
    state: str = "pending"                # pending → adopted | released
    deadline: float = 0.0
    timer: asyncio.TimerHandle | None = None


class MigrationTargets:
    """The incoming migrations of one worker.

    is_open() tells whether this instance takes migrations now (False while draining or stopping).
    MigrationStage RPCs run on the asyncio loop; commits on KV receiver threads; one lock orders
    them, so a migration is adopted or released, never both.
    """

    def __init__(self, engine_thread: EngineThread, receiver, leases: LeaseTable, *, block_size: int,
                 max_in_flight: int, watermark_blocks: int, is_open: Callable[[], bool]):
        self.et, self.receiver, self.leases = engine_thread, receiver, leases
        self.block_size, self.max_in_flight, self.watermark_blocks = block_size, max_in_flight, watermark_blocks
        self.is_open = is_open
        self._migrations: dict[str, IncomingMigration] = {}
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.on_event: Callable[[str, str], None] = lambda event, reason: None   # ("adopted"|"released", reason)

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for m in self._migrations.values() if m.state == "pending")

    @property
    def reserved_blocks(self) -> int:
        with self._lock:
            return sum(len(m.block_ids) for m in self._migrations.values() if m.state == "pending")

    # ---- asyncio loop -----------------------------------------------------------------------
    async def _shielded(self, coro):
        """Run `coro` to its end even if the caller (an RPC) is cancelled: a reservation made or
        freed half-way would otherwise be lost track of. What it leaves pending, its lease frees."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def stage(self, request_id: str, stage: int, num_tokens: int, *, prompt=None, params=None, priority=0,
                    source_instance_id: str = "", lease_ms: int = 10_000) -> int:
        """Reserve (stage 0) or grow the reservation to cover `num_tokens` positions and expect the
        stage's transfer. Returns the blocks reserved. Raises MigrationRefused."""
        return await self._shielded(self._stage(request_id, stage, num_tokens, prompt, params, priority,
                                                source_instance_id, lease_ms))

    async def _stage(self, request_id, stage, num_tokens, prompt, params, priority, source_instance_id, lease_ms):
        if stage == 0:
            m = await self._open(request_id, prompt, params, priority, source_instance_id, lease_ms, num_tokens)
        else:
            with self._lock:
                m = self._migrations.get(request_id)
            if m is None or m.state != "pending":
                raise MigrationRefused("NOT_FOUND", "dest_refused", f"no pending migration of {request_id!r} "
                                       f"here (its reservation expired or was cancelled); start again at stage 0")
            if cdiv(num_tokens, self.block_size) > len(m.block_ids):
                try:
                    table = await asyncio.to_thread(self.et.call, lambda e: e.extend_reservation(request_id, num_tokens),
                                                    None)     # no timeout: a call that ran late would be lost
                except RuntimeError as e:
                    raise MigrationRefused("RESOURCE_EXHAUSTED", "dest_oom", str(e)) from e
                except (ValueError, EngineDeadError) as e:
                    raise MigrationRefused("ABORTED", "dest_refused", str(e)) from e
                with self._lock:
                    m.block_ids = table
        with self._lock:
            if m.state != "pending":
                raise MigrationRefused("ABORTED", "dest_refused", f"the migration of {request_id!r} was released")
            self._expect(m, stage)
            self._renew(m)
            return len(m.block_ids)

    async def _open(self, request_id, prompt, params, priority, source_instance_id, lease_ms, num_tokens):
        if not self.is_open():
            raise MigrationRefused("FAILED_PRECONDITION", "dest_refused",
                                   "this instance is draining or stopping and takes no migrations")
        with self._lock:
            if request_id in self._migrations:
                raise MigrationRefused("ALREADY_EXISTS", "dest_refused", f"{request_id!r} is already migrating here")
            if len([m for m in self._migrations.values() if m.state == "pending"]) >= self.max_in_flight:
                raise MigrationRefused("RESOURCE_EXHAUSTED", "dest_busy", f"{self.max_in_flight} migrations are "
                                       f"already coming in; retry later")
            m = IncomingMigration(request_id, list(prompt), params, priority, source_instance_id,
                                  asyncio.get_running_loop(), lease_ms / 1e3)
            self._migrations[request_id] = m

        def reserve(engine):
            need = engine.kv.blocks_needed(request_id, num_tokens)
            if engine.kv.num_free_blocks - need < self.watermark_blocks:
                raise RuntimeError(f"taking {need} blocks would leave {engine.kv.num_free_blocks - need} free, "
                                   f"below the {self.watermark_blocks}-block watermark")
            return engine.reserve(request_id, num_tokens)
        try:
            table = await asyncio.to_thread(self.et.call, reserve, None)
        except BaseException as e:
            with self._lock:
                self._migrations.pop(request_id, None)
            if isinstance(e, RuntimeError) and not isinstance(e, EngineDeadError):
                raise MigrationRefused("RESOURCE_EXHAUSTED", "dest_oom", f"{e}; pick another destination") from e
            if isinstance(e, ValueError):
                raise MigrationRefused("ALREADY_EXISTS", "dest_refused", str(e)) from e
            if isinstance(e, EngineDeadError):
                raise MigrationRefused("UNAVAILABLE", "dest_refused", f"engine stopped: {e}") from e
            raise
        with self._lock:
            m.block_ids = table
        return m

    async def cancel(self, request_id: str, reason: str) -> bool:
        """Free a pending migration's reservation (the source gave up). False if none is pending."""
        return await self._shielded(self._cancel(request_id, reason))

    async def _cancel(self, request_id: str, reason: str) -> bool:
        with self._lock:
            m = self._migrations.get(request_id)
            if m is None or m.state != "pending":
                return False
            m.state = "released"
            if m.timer is not None:
                m.timer.cancel()
        await asyncio.to_thread(self.receiver.forget, stage_transfer_id(request_id, m.stage))
        try:
            await asyncio.to_thread(self.et.call, lambda e: e.release(request_id))
        except EngineDeadError:
            pass
        with self._lock:
            self._migrations.pop(request_id, None)
        self.on_event("released", reason)
        log.info("incoming migration of %s released: %s", request_id, reason)
        return True

    async def close(self) -> None:
        """Release every pending migration (the instance is stopping)."""
        with self._lock:
            pending = [rid for rid, m in self._migrations.items() if m.state == "pending"]
        for rid in pending:
            await self.cancel(rid, "the instance is stopping")

    # ---- under the lock ------------------------------------------------------------------
    def _expect(self, m: IncomingMigration, stage: int) -> None:
        """(Re-)expect stage `stage`'s transfer into the whole current reservation."""
        self.receiver.forget(stage_transfer_id(m.request_id, m.stage))
        if stage != m.stage:
            self.receiver.forget(stage_transfer_id(m.request_id, stage))
        m.stage = stage
        self.receiver.expect(stage_transfer_id(m.request_id, stage), m.block_ids, self._on_commit)

    def _renew(self, m: IncomingMigration) -> None:
        m.deadline = time.monotonic() + m.lease_s
        m.loop.call_soon_threadsafe(self._arm, m)

    def _arm(self, m: IncomingMigration) -> None:
        if m.timer is not None:
            m.timer.cancel()
        if m.state == "pending":
            m.timer = m.loop.call_later(max(0.0, m.deadline - time.monotonic()), self._expire, m)

    def _expire(self, m: IncomingMigration) -> None:
        if m.state == "pending" and time.monotonic() >= m.deadline:
            task = m.loop.create_task(self._cancel(m.request_id, "lease expired: the source stopped calling"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ---- KV receiver thread ---------------------------------------------------------------
    def _on_commit(self, transfer_id: str, num_tokens: int, meta: dict) -> str | None:
        request_id, _, stage = transfer_id.rpartition("#m")
        with self._lock:
            m = self._migrations.get(request_id)
            if m is None or m.state != "pending":
                return f"no pending migration of {request_id!r} here"
            if not meta.get("final"):
                self._expect(m, int(stage) + 1)
                self._renew(m)
                return None
            outputs = [int(t) for t in meta["output_token_ids"]]
            recompute = bool(meta.get("recompute"))
            n_computed = len(m.prompt_token_ids) + len(outputs) - 1
            if not recompute and (num_tokens != n_computed or n_computed > len(m.block_ids) * self.block_size):
                return (f"the final stage covers {num_tokens} positions, the request needs {n_computed} "
                        f"in {len(m.block_ids)} blocks")
            logprobs = [math.nan if x is None else float(x) for x in meta.get("output_logprobs") or []] or None
            try:
                stream = self.et.adopt(request_id, m.prompt_token_ids, outputs, m.params, m.priority, logprobs,
                                       stream_cls=AsyncRequestStream.factory(m.loop), recompute=recompute)
            except Exception as e:                 # the engine stopped: refuse; the source resumes
                return f"could not start decoding: {e}"
            m.state = "adopted"
            self._migrations.pop(request_id, None)
            lease = Lease(request_id, m.prompt_token_ids, m.params, m.priority, m.block_ids, m.deadline, m.loop,
                          stream=stream, output_token_ids=outputs)
        if m.timer is not None:
            m.loop.call_soon_threadsafe(m.timer.cancel)
        self.leases.add_adopted(lease)
        self.on_event("adopted", "")
        return None
