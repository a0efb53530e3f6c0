"""The tandem.v1.Worker servicer: a thin asyncio layer over the engine thread, the lease table
and the KV transport. Every RPC maps user-fixable errors to INVALID_ARGUMENT naming the field,
and every exit path (finish, cancel, error, timeout) gives back what the request held.

A request's path (DESIGN "Request life"): the router starts Decode (with the request: this decode
instance reserves) and Prefill (with the decode instance's KV address) at the same time. Prefill
submits the prompt to the engine at once and opens the KV transfer beside it; its pushes wait in
the pusher until the transfer is open, and the decode instance's receiver holds the transfer's
frames until the reservation lands. Requests come validated by the router: workers re-check only
what is cheap and would crash the engine (ids out of the vocabulary, lengths, their own capacity).

The RPCs live by side: rpc_decode.py (Reserve, Decode, Recompute), rpc_prefill.py (Prefill),
rpc_streams.py (Generate, Outputs), rpc_control.py (Release, migration, SetState, SetRole, Stats),
each a mixin of WorkerServicer. This class holds the state they share (`et`, `engine`, `role`,
`leases`, the KV sender, receiver and pusher, migration `sources` and `targets`, `outputs`, `parked`)
and the helpers they call (`_engine_call`, `_request_fields`, `_require_role`, `_release_soon`,
`_stream_out`).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable

import grpc

from services.roles import Role, WorkerState
from services.engine.engine_thread import EngineDeadError, EngineThread
from services.engine.sampling_params import MAX_WORKER_REQUEST_ID_CHARS, check_request_id
from services.proto_convert import sampling_params_from_proto
from services.worker.async_stream import AsyncRequestStream
from services.worker.rpc_control import ControlRpcs
from services.worker.rpc_decode import DecodeRpcs
from services.worker.rpc_prefill import PrefillRpcs
from services.worker.rpc_streams import StreamRpcs
from services.worker.output_sinks import OutputSinks, SinkClosed
from services.worker.parked import ParkedRequests
from services.worker.settings import WORKER_DEFAULTS
from services.worker.token_chunks import ChunkCursor, token_chunks
from services.worker.kv_push import PrefillPusher
from services.worker.leases import LeaseTable
from services.worker.migration_in import MigrationTargets
from services.worker.migration_out import MigrationConfig, MigrationSources
from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("tandem.worker")


class WorkerServicer(DecodeRpcs, PrefillRpcs, StreamRpcs, ControlRpcs, worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine_thread: EngineThread, *, role: Role, sender, receiver, pusher: PrefillPusher | None,
                 lease_ms: int, transfer_timeout_s: float, report_fn, instance_id: str, kv_transport: str,
                 migration: MigrationConfig | None = None, watermark_blocks: int = 0,
                 state_fn: Callable[[], str] = lambda: WorkerState.SERVING, set_state_fn: Callable[[str], None] | None = None,
                 kv_address: str | None = None, on_role_change: Callable[[], None] = lambda: None,
                 on_full: Callable[[], None] = lambda: None,
                 orphan_grace_s: float = WORKER_DEFAULTS.orphan_grace_s):
        """kv_address: the data-plane address published to peers (KVHandle.address, migration
        stages); default the receiver's bound address. `role` is the home role; SetRole changes
        `self.role` (what new work is taken) and then calls on_role_change (publish the record).
        orphan_grace_s: how long a request whose reader was lost stays parked (parked.py; 0: off)."""
        self.et, self.engine = engine_thread, engine_thread.engine
        self.role, self.sender, self.receiver, self.pusher = role, sender, receiver, pusher
        self.home_role, self.on_role_change = role, on_role_change
        self.mixed_prefill_tokens, self.role_switches = engine_thread.engine.scheduler.mixed_prefill_tokens, 0
        self.kv_address = kv_address or receiver.address
        self.lease_ms, self.transfer_timeout_s = lease_ms, transfer_timeout_s
        self.report_fn = report_fn
        self.instance_id, self.kv_transport = instance_id, kv_transport
        self.state_fn, self.set_state_fn = state_fn, set_state_fn
        self.on_full = on_full          # a reservation was refused for room: publish a fresh load report
        self.leases = LeaseTable(self._adopt, self._release_lease, receiver.forget)
        self._prefills: dict[str, AsyncRequestStream] = {}
        self._decoding: set[str] = set()      # requests whose Decode stream claimed their lease
        self.outputs = OutputSinks()          # routers' Outputs streams (output_sinks.py)
        migration = migration or MigrationConfig(transfer_timeout_s=transfer_timeout_s)
        self.peers = WorkerPool()          # channels to other workers (migration destinations)
        block_size = self.engine.kv.block_size
        self.sources = MigrationSources(engine_thread, sender, self.peers, instance_id, block_size=block_size,
                                        config=migration)
        self.sources.on_event = self._migration_event
        self.targets = MigrationTargets(engine_thread, receiver, self.leases, block_size=block_size,
                                        max_in_flight=migration.max_in_flight, watermark_blocks=watermark_blocks,
                                        is_open=lambda: self.state_fn() == WorkerState.SERVING)
        self.parked = ParkedRequests(orphan_grace_s, moved=self.sources.moved_to)   # requests no router reads
        self.sources.pinned = self.parked.__contains__

    # ---- helpers --------------------------------------------------------------------------
    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def _engine_call(self, fn):
        """fn(engine) on the engine thread, between steps; its result (or exception) here. The
        engine thread settles the future itself: no worker thread in between. If the caller is
        cancelled, fn still runs."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.et.call_soon(fn, lambda ok, value: loop.call_soon_threadsafe(_settle, future, ok, value))
        return await future

    def _release_soon(self, rid: str) -> None:
        """Free what the engine still holds for rid (a handed-off prompt's blocks stay as prefix
        cache), without waiting: queued now, so it runs before anything sent later under the same
        id, but the caller's answer does not wait for the engine step to end. Failures are logged."""
        try:
            self.et.call_soon(lambda e: e.release(rid))
        except EngineDeadError:
            pass

    def _request_fields(self, req: worker_pb2.WorkerRequest):
        """(prompt ids, engine SamplingParams) of a request the router validated, checked again only
        cheaply (ids in range by min/max, lengths, this instance's capacity): a malformed one is
        refused instead of crashing the engine. Raises InvalidRequestError."""
        check_request_id(req.request_id, MAX_WORKER_REQUEST_ID_CHARS)
        params = sampling_params_from_proto(req.params)
        prompt = list(req.prompt_token_ids)
        self.engine.validate(prompt, params, ints=True)
        return prompt, params

    async def _stream_out(self, stream: AsyncRequestStream, cursor: ChunkCursor, context,
                          replay: Iterable[worker_pb2.TokenChunk] = ()) -> AsyncIterator[worker_pb2.TokenChunk]:
        """A request stream's chunks (Decode, Generate): `replay` then the engine stream's, read through
        `cursor` (token_chunks.py) and relayed through the caller's Outputs stream when it names one
        (output_sinks.py), else yielded. Once iterated, the engine stream is this generator's to
        settle: when the reader is lost before the request finished (the call is cancelled or
        dropped, or its Outputs stream closes under it: that ends the call UNAVAILABLE) the request
        is parked (parked.py) for a router to take back; on every other exit, and when parking
        refuses, the engine stream is cancelled (a no-op once finished). Close it (aclosing) when
        abandoning it early, so that this happens at once."""
        if self.parked.enabled:
            cursor.keep_history()           # from the first chunk: a new reader may need any of them
        chunks = token_chunks(stream, cursor, context, self.sources.moved_to, replay)
        relayed = self.outputs.relay(chunks, context, stream.request_id, stream, cursor)
        lost: str | None = None
        closed: SinkClosed | None = None
        try:
            async for chunk in relayed:
                yield chunk
        except SinkClosed as e:
            lost, closed = str(e), e
        except (asyncio.CancelledError, GeneratorExit):
            lost = "its call ended: the router died or dropped it"
            raise
        finally:
            await relayed.aclose()          # unsets the stream's divert: a parked request's task reads alone
            await chunks.aclose()
            parked = lost is not None and self.parked.park(stream, cursor, lost)
            if not parked:
                stream.cancel()                       # no-op once finished
        if closed is not None:
            then = (f"parked for {self.parked.grace_s:g} s: Decode(request_id, start_index) takes it back" if parked
                    else "the router re-dispatches it")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{closed}; {then}")

    async def _require_role(self, context, *roles: Role, what: str):
        if self.role not in roles:
            names = " or ".join(r.name.lower() for r in roles)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{what} needs a {names} instance; this one is {self.role.name.lower()}")


def _settle(future: asyncio.Future, ok: bool, value) -> None:
    if future.done():              # its awaiter was cancelled
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
