"""Carries one request through the cluster and turns worker messages into client messages.

Disaggregated path (DESIGN "Request life"), one round trip before the prefill: placement picks a
decode instance D and a prefill instance P from their last load reports, then the router starts
D's Decode stream (carrying the request: D reserves its blocks there and says so in the stream's
initial metadata) and P's Prefill (carrying D's KV address from its report) at the same time,
awaiting neither first. P computes at once and pushes KV to D as its layers finish; D's receiver
holds the pushes until the reservation lands. The first token comes from P's answer, every later
one from D's stream. If D refuses before that (RESOURCE_EXHAUSTED: it is full, its report was
stale; UNAVAILABLE: draining), P's call is cancelled and the request is placed again: a full D is
passed over until a newer report of it arrives, and while every D is full the request waits
(queue_timeout_s). When the KV could not move (P answers with kv_fallback), D is asked to Recompute
the prompt and first token instead, and its stream goes on as usual. Colocated path: one Generate
stream on a colocated instance. Any exit other than a normal finish (client cancel, deadline,
abort, error) sends Release to every worker that may hold something for the request. An instance
lost while it serves the request (UNAVAILABLE, or a stream that ends unfinished) raises WorkerLost:
router/request/redispatch.py carries the request on elsewhere.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import grpc

from router.request.outputs_hub import OutputsHub
from router.request.placement import (InflightLedger, pick_by_prefix, pick_colocated, pick_decode, pick_prefill,
                                      pick_whole_request)
from router.cluster.prefix_index import PrefixIndex, cached_tokens
from router.cluster.registry import InstanceRegistry
from services.engine.blocks import cdiv
from services.worker.settings import LEASE_MS
from services.worker_pool import WorkerPool
from services.engine.queue_order import DEFAULT_AGING_S, FCFS, order_key, remaining_work
from services.engine.sampling_params import SamplingParams
from tandem.v1 import serving_pb2, worker_pb2

RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
SETTLE_TRIES, SETTLE_S = 8, 0.02      # waits (0.02 s, 0.04 s, ...; 0.72 s in all) for a worker to drop a cancelled attempt


class _DecodeRefused(Exception):
    """The decode instance refused the request before its first token (RETRY_CODES): place it again."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _RoleChanged(Exception):
    """A switched instance no longer serves whole requests (its role changed after the router's
    view of it): nothing was sent, so the request is placed again the usual way."""


class RouteError(Exception):
    """Ends the client's stream with `code` and a message saying what to change or retry."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message
        self.blocks_needed = 0          # RESOURCE_EXHAUSTED from placement: the KV blocks that did not fit


class WorkerLost(RouteError):
    """The instance serving the request died or dropped its stream (UNAVAILABLE, or a stream that
    ended unfinished). UNAVAILABLE for the client unless router/request/redispatch.py resumes the request
    elsewhere; `reason` is the label of tandem_redispatches_total."""

    def __init__(self, instance_id: str, reason: str, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.instance_id, self.reason = instance_id, reason


@dataclasses.dataclass
class RoutedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    worker_request: worker_pb2.WorkerRequest
    arrival: float                                  # time.monotonic()
    timeout: float | None = None                    # seconds left of the client's deadline
    aborted: bool = False                           # set by the Abort RPC
    kv_fallback: str = ""                           # why its KV did not move (D recomputed); metrics read it
    dispatched: float | None = None                 # time.monotonic() when its first worker call started
    calls: list = dataclasses.field(default_factory=list)   # in-flight worker calls, cancelled on abort
    expected_output_tokens: int = 0                 # the client's hint (0: none), validated
    slo_ttft_s: float = 0.0                         # the request's TTFT SLO (0: the cluster default)
    predicted_output_tokens: float = 0.0            # the router's median prediction (0: none yet)
    # A client resuming after its router died (GenerateRequest.resume): the tokens it has. None: a
    # new request. The stream starts at index len(resume_token_ids) (router/request/redispatch.py).
    resume_token_ids: list[int] | None = None

    def order_fields(self) -> tuple[int, float, float]:
        """(priority, arrival, predicted work) for services/engine/queue_order.py."""
        predicted = self.predicted_output_tokens or self.params.max_tokens
        return self.worker_request.priority, self.arrival, remaining_work(len(self.prompt_token_ids), predicted)
    memo: dict = dataclasses.field(default_factory=dict)    # placement's per-request cache (prompt block hashes)

    def abort(self) -> None:
        self.aborted = True
        for call in self.calls:
            call.cancel()


@dataclasses.dataclass
class _Holder:
    """The instance that decodes the request now, and the stream the router reads from it."""
    address: str
    instance_id: str
    call: object
    moves: int = 0
    outputs: str = ""          # the OutputsHub subscription `call` was made with ("": none)


class Dispatcher:
    def __init__(self, registry: InstanceRegistry, pool: WorkerPool, *, lease_ms: int = LEASE_MS,
                 retries: int = 2, rpc_timeout_s: float = 30.0, queue_timeout_s: float = 10.0,
                 queue_poll_s: float = 0.05, prefix_index: PrefixIndex | None = None,
                 queue_policy: str = FCFS, aging_s: float = DEFAULT_AGING_S):
        self.registry, self.pool, self.lease_ms = registry, pool, lease_ms
        self.retries, self.rpc_timeout_s = retries, rpc_timeout_s
        self.queue_timeout_s, self.queue_poll_s = queue_timeout_s, queue_poll_s
        self.ledger = InflightLedger()
        self.prefix_index = prefix_index        # --routing prefix: who caches what (None: load only)
        self.demand: dict[str, int] = {}       # request_id → KV blocks it waits for (no instance has room)
        # Requests waiting for room, served in queue_policy order (services/engine/queue_order.py):
        # under sjf only the first in that order tries to place; fcfs lets every waiter try.
        self.queue_policy, self.aging_s = queue_policy, aging_s
        self.queued: dict[str, RoutedRequest] = {}
        self.outputs = OutputsHub(pool)        # workers' Outputs streams: a step's tokens in one message

    def _cached(self, rr: RoutedRequest, pool: list) -> dict[str, int] | None:
        """--routing prefix: instance → prompt tokens its prefix cache holds; None under load routing."""
        if self.prefix_index is None or not pool:
            return None
        return cached_tokens(self.prefix_index, rr.prompt_token_ids, max(1, pool[0].block_size), rr.memo)

    def _uncached(self, rr: RoutedRequest, instance) -> int:
        """Prompt tokens `instance` must compute for rr (all of them under load routing)."""
        cached = self._cached(rr, [instance]) or {}
        return len(rr.prompt_token_ids) - cached.get(instance.instance_id, 0)

    def pending_demand_blocks(self) -> int:
        """The largest KV need of a request queued for room (the rescheduler de-fragments for it)."""
        return max(self.demand.values(), default=0)

    async def _place_queued(self, rr: RoutedRequest, role: int, pick, tried: set[str], what: str,
                            full: dict[str, int] | None = None):
        """_place, but while every instance is full the request waits (up to queue_timeout_s and
        its deadline) with its need published as demand, instead of failing at once."""
        waited_until = time.monotonic() + self.queue_timeout_s
        try:
            while True:
                if self._turn(rr):
                    try:
                        return self._place(rr, role, pick, tried, what, full)
                    except RouteError as e:
                        if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() >= waited_until \
                                or self._timeout(rr) <= self.queue_poll_s:
                            raise
                        self.demand[rr.request_id] = e.blocks_needed
                elif time.monotonic() >= waited_until or self._timeout(rr) <= self.queue_poll_s:
                    raise RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"every {what} instance is full and "
                                     f"{len(self.queued)} requests wait for room before this one; retry later")
                self.queued[rr.request_id] = rr
                await asyncio.sleep(self.queue_poll_s)
        finally:
            self.demand.pop(rr.request_id, None)
            self.queued.pop(rr.request_id, None)

    def _turn(self, rr: RoutedRequest) -> bool:
        """Whether rr may try to place now: always under fcfs; under sjf when no request waiting for
        room goes before it in the queue order."""
        if self.queue_policy == FCFS or not self.queued:
            return True
        now = time.monotonic()

        def key(x: RoutedRequest) -> tuple:
            priority, arrival, work = x.order_fields()
            return order_key(self.queue_policy, priority=priority, arrival=arrival, work=work, now=now,
                             aging_s=self.aging_s)
        mine = key(rr)
        return not any(key(x) < mine for x in self.queued.values() if x is not rr)

    def _pool(self, role: int) -> list:
        """Serving instances that take `role`'s work now. PREFILL, DECODE: those in the role plus
        switched instances (adaptive pools: COLOCATED now) at home in it. COLOCATED: every
        instance that serves whole requests (the baseline's and switched ones)."""
        r = self.registry
        if role == worker_pb2.ROLE_COLOCATED:
            return r.instances(role)
        return r.instances(role) + [c for c in r.instances(worker_pb2.ROLE_COLOCATED) if c.home_role == role]

    def pools(self):
        """(prefill-capable, decode-capable, baseline colocated) serving instances."""
        baseline = [c for c in self.registry.instances(worker_pb2.ROLE_COLOCATED)
                    if c.home_role not in (worker_pb2.ROLE_PREFILL, worker_pb2.ROLE_DECODE)]
        return self._pool(worker_pb2.ROLE_PREFILL), self._pool(worker_pb2.ROLE_DECODE), baseline

    def _whole_request_instance(self, rr: RoutedRequest):
        """Adaptive pools: the switched instance that should prefill and decode this request itself
        (placement.pick_whole_request), or None to disaggregate."""
        reports = self.registry.instances(None)
        if not any(r.role == worker_pb2.ROLE_COLOCATED and r.home_role in (worker_pb2.ROLE_PREFILL,
                                                                            worker_pb2.ROLE_DECODE) for r in reports):
            return None
        needed = cdiv(len(rr.prompt_token_ids), max(1, reports[0].block_size))
        return pick_whole_request(reports, len(rr.prompt_token_ids), needed, self.ledger)

    async def generate(self, rr: RoutedRequest) -> AsyncIterator[serving_pb2.GenerateResponse]:
        prefill, decode, colocated = self.pools()
        whole = self._whole_request_instance(rr)
        if whole is not None:
            try:
                async with contextlib.aclosing(self._colocated(rr, first=whole.instance_id)) as stream:
                    async for message in stream:
                        yield message
                return
            except _RoleChanged:
                prefill, decode, colocated = self.pools()
        if prefill and decode:
            stream = self._disaggregated(rr)
        elif colocated:
            stream = self._colocated(rr)
        else:
            raise RouteError(grpc.StatusCode.UNAVAILABLE, self._missing_message(prefill, decode))
        async with contextlib.aclosing(stream):         # its clean-up runs now when we are closed
            async for message in stream:
                yield message

    @staticmethod
    def _missing_message(prefill, decode) -> str:
        if prefill and not decode:
            return "no decode instance is serving (prefill instances are up); start a decode worker or wait for one"
        if decode and not prefill:
            return "no prefill instance is serving (decode instances are up); start a prefill worker or wait for one"
        return ("no instance is serving this cluster: start prefill and decode (or colocated) workers, "
                "e.g. `tandem up`, or wait for them to register")

    def _timeout(self, rr: RoutedRequest) -> float:
        if rr.timeout is None:
            return self.rpc_timeout_s
        return max(0.001, rr.timeout - (time.monotonic() - rr.arrival))

    def _stream_timeout(self, rr: RoutedRequest) -> float | None:
        return None if rr.timeout is None else self._timeout(rr)

    def _place(self, rr: RoutedRequest, role: int, pick, tried: set[str], what: str,
               full: dict[str, int] | None = None):
        """(instance, KV blocks the prompt needs) chosen by `pick` among serving instances of `role`
        not tried yet; None when none is left. RESOURCE_EXHAUSTED when none has room, counting as
        full those in `full` (instance → updated_unix_ms of the report under which it refused)
        until a newer report of theirs arrives."""
        pool = [i for i in self._pool(role) if i.instance_id not in tried]
        if not pool:
            return None
        needed = cdiv(len(rr.prompt_token_ids), max(1, pool[0].block_size))
        if full:
            pool = [i for i in pool if full.get(i.instance_id) != i.updated_unix_ms]
        chosen = pick(pool, needed, self.ledger) if pool else None
        if chosen is None:
            error = RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"every {what} instance is full ({needed} KV blocks needed); retry later")
            error.blocks_needed = needed
            raise error
        return chosen, needed

    # ---- disaggregated ----------------------------------------------------------------------
    async def _disaggregated(self, rr: RoutedRequest):
        full: dict[str, int] = {}       # decode instances that refused for room → their report then
        tried: set[str] = set()         # decode instances that refused otherwise (draining, unreachable)
        last_error = ""
        for _ in range(self.retries + 1):
            placed = await self._place_queued(rr, worker_pb2.ROLE_DECODE, pick_decode, tried, "decode", full)
            if placed is None:
                break
            d, needed = placed
            try:
                async with contextlib.aclosing(self._via(rr, d, needed)) as stream:
                    async for message in stream:
                        yield message
                return
            except _DecodeRefused as e:            # raised before any message: safe to place again
                if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    full[d.instance_id] = d.updated_unix_ms
                else:
                    self.registry.mark_unreachable(d.instance_id)
                    tried.add(d.instance_id)
                last_error = f"{d.instance_id}: {e.details}"
        raise RouteError(grpc.StatusCode.UNAVAILABLE, f"no decode instance could take the request ({last_error}); retry")

    async def _via(self, rr: RoutedRequest, d, needed: int):
        """The request through decode instance d (and a prefill instance _prefill picks): P's Prefill
        and D's Decode stream start together (Prefill first: it is the critical path; the
        reservation overlaps the compute). Raises _DecodeRefused, before yielding anything, when D
        refuses to reserve."""
        rr.dispatched = rr.dispatched or time.monotonic()
        d_token = self.ledger.add(d.instance_id, blocks=needed, running=1)
        d_held = self.ledger.hold(d.instance_id)          # until the request ends here (at_seq_cap)
        holder = _Holder(d.address, d.instance_id, None)
        reservation: list[asyncio.Future] = []

        def start_decode() -> asyncio.Future:
            """D's Decode stream, started once; the future of its reservation (_reservation)."""
            if not reservation:
                holder.call, holder.outputs = self.outputs.call(d.address, "Decode", worker_pb2.DecodeRequest(
                    request_id=rr.request_id, start_index=1, request=rr.worker_request, lease_ms=self.lease_ms),
                    self._stream_timeout(rr))
                rr.calls.append(holder.call)
                reservation.append(asyncio.ensure_future(_reservation(holder.call)))
            return reservation[0]
        finished = refused = False
        try:
            try:
                p, presp = await self._prefill(rr, d, start_decode)
                if presp.kv_fallback and not presp.finished:      # Recompute needs D's reservation
                    _check_reservation(rr, d, await reservation[0])
            except _DecodeRefused:
                refused = True
                raise
            first = serving_pb2.GenerateResponse(
                request_id=rr.request_id, index=0, token_ids=[presp.first_token_id], text=presp.first_text,
                prefill_instance=p.instance_id, decode_instance=d.instance_id)
            if rr.params.logprobs is not None:
                first.logprobs.append(presp.first_logprob)
                if rr.params.logprobs > 0:
                    first.top_logprobs.append(presp.first_top_logprobs)
            breakdown = serving_pb2.TtftBreakdown(
                queue_s=presp.queue_s, prefill_s=presp.prefill_s, transfer_s=presp.transfer_s,
                kv_bytes=presp.kv_bytes, kv_fallback=presp.kv_fallback)
            if presp.kv_fallback and not presp.finished:    # before the first token: still safe to retry
                await self._recompute(rr, d, presp)
            _time_first_token(rr, breakdown)
            if presp.finished:
                first.finished, first.finish_reason = True, presp.finish_reason
                first.usage.CopyFrom(serving_pb2.Usage(prompt_tokens=len(rr.prompt_token_ids), completion_tokens=1,
                                                       cached_prompt_tokens=presp.num_cached_tokens))
                first.ttft_breakdown.CopyFrom(breakdown)
                yield first            # D may hold a lease: the finally block releases it
                return
            yield first
            async for chunk, moved in self._follow(rr, holder):
                if d_token is not None:        # D's own report counts the request from now on
                    self.ledger.remove(d_token)
                    d_token = None
                if chunk.first_decode_s and not holder.moves:
                    breakdown.first_decode_s = chunk.first_decode_s
                message = _from_chunk(rr.request_id, chunk)
                if moved:
                    message.decode_instance = holder.instance_id
                    self.ledger.let_go(d_held)
                    d_held = self.ledger.hold(holder.instance_id)
                if chunk.finished:
                    finished = chunk.finish_reason != serving_pb2.FINISH_REASON_ABORT
                    message.usage.CopyFrom(serving_pb2.Usage(
                        prompt_tokens=len(rr.prompt_token_ids), completion_tokens=chunk.index + len(chunk.token_ids),
                        cached_prompt_tokens=presp.num_cached_tokens))
                    message.ttft_breakdown.CopyFrom(breakdown)
                yield message
                if chunk.finished:
                    return
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and rr.aborted:
                raise asyncio.CancelledError from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.registry.mark_unreachable(holder.instance_id)
                raise WorkerLost(holder.instance_id, "decode_lost",
                                 f"decode instance {holder.instance_id}: {e.details()}") from None
            raise RouteError(e.code(), f"decode instance {holder.instance_id}: {e.details()}") from None
        finally:
            for future in reservation:
                future.cancel()
            self.ledger.let_go(d_held)
            if d_token is not None:
                self.ledger.remove(d_token)
            if holder.call is not None:              # None: no prefill instance could be asked, nor D
                rr.calls.remove(holder.call)
                if not finished:
                    holder.call.cancel()
                    if not refused:                  # a refusing D holds nothing for the request
                        self.pool.release_later(holder.address, rr.request_id)
                    if holder.address != d.address:  # D forwards too, but it may be gone
                        self.pool.release_later(d.address, rr.request_id)

    async def _prefill(self, rr: RoutedRequest, d, start_decode):
        """(P, its PrefillResponse) from a prefill instance P, the KV going to d. start_decode() is
        called right after the first Prefill call went out; the reservation it returns races the
        prefill: if d refuses first, P's call is cancelled (_check_reservation raises). A P that is
        unreachable is marked so and another one tried."""
        handle = worker_pb2.KVHandle(instance_id=d.instance_id, transport=d.kv_transport, address=d.kv_address,
                                     request_id=rr.request_id, block_size=d.block_size)
        tried: set[str] = set()
        last_error = ""
        tries, settles = self.retries + 1, 0
        while tries > 0:
            tries -= 1
            prefills = [p for p in self._pool(worker_pb2.ROLE_PREFILL) if p.instance_id not in tried]
            p = pick_prefill(prefills, len(rr.prompt_token_ids), self.ledger, self._cached(rr, prefills))
            if p is None:
                break
            token = self.ledger.add(p.instance_id, prompt_tokens=self._uncached(rr, p))
            call = self.pool.stub(p.address).Prefill(
                worker_pb2.PrefillRequest(request=rr.worker_request, destination=handle), timeout=self._timeout(rr))
            rr.calls.append(call)
            answer = asyncio.ensure_future(call)
            reserved = start_decode()
            try:
                if not reserved.done():
                    await asyncio.wait((answer, reserved), return_when=asyncio.FIRST_COMPLETED)
                if not answer.done():                  # D answered first
                    try:
                        _check_reservation(rr, d, reserved.result())
                    except BaseException:
                        answer.cancel()
                        raise
                return p, await answer
            except asyncio.CancelledError:
                answer.cancel()
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and rr.aborted:
                    raise asyncio.CancelledError from None
                if e.code() == grpc.StatusCode.ALREADY_EXISTS and settles < SETTLE_TRIES:
                    # The router keeps request ids unique, so this is P still tearing down this
                    # request's attempt that the router just cancelled (a refused D): wait for it
                    # (no Release: this call holds nothing on P, and one racing the retry could end it).
                    settles, tries = settles + 1, tries + 1
                    await asyncio.sleep(SETTLE_S * settles)
                    continue
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    raise RouteError(grpc.StatusCode.UNAVAILABLE,
                                     f"prefill instance {p.instance_id} still holds an earlier attempt; retry") from None
                self.pool.release_later(p.address, rr.request_id)
                if e.code() == grpc.StatusCode.ABORTED:       # P is fine; the way to D failed
                    raise RouteError(grpc.StatusCode.UNAVAILABLE, f"{e.details()}; retry") from None
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise RouteError(e.code(), e.details()) from None
                self.registry.mark_unreachable(p.instance_id)
                tried.add(p.instance_id)
                last_error = f"{p.instance_id}: {e.details()}"
            finally:
                rr.calls.remove(call)
                self.ledger.remove(token)
        raise RouteError(grpc.StatusCode.UNAVAILABLE, f"no prefill instance could take the request ({last_error}); retry")

    async def _recompute(self, rr: RoutedRequest, d, presp: worker_pb2.PrefillResponse) -> None:
        """P could not move the KV to D (presp.kv_fallback): D recomputes prompt + first token.

        NOT_FOUND is let through: D's lease is gone because a late KV commit adopted the request and
        its Decode stream took it (or there was none, and that stream fails with its own error).
        Anything else fails the request with UNAVAILABLE naming both reasons."""
        rr.kv_fallback = presp.kv_fallback
        try:
            await self.pool.stub(d.address).Recompute(worker_pb2.RecomputeRequest(
                request_id=rr.request_id, first_token_id=presp.first_token_id, first_logprob=presp.first_logprob,
                first_top_logprobs=presp.first_top_logprobs), timeout=self._timeout(rr))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and rr.aborted:
                raise asyncio.CancelledError from None
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return
            message = f"{presp.kv_fallback}; decode instance {d.instance_id} could not recompute it either: {e.details()}"
            if e.code() == grpc.StatusCode.UNAVAILABLE:       # D is gone: nothing was sent yet, place it again
                self.registry.mark_unreachable(d.instance_id)
                raise WorkerLost(d.instance_id, "decode_lost", message) from None
            raise RouteError(grpc.StatusCode.UNAVAILABLE, f"{message}; retry") from None

    async def _follow(self, rr: RoutedRequest, holder: _Holder):
        """(chunk, moved) for every chunk of the holder's stream until the finished one; when the
        request migrates (a chunk carries `migrated`), its tokens are yielded and the stream goes on
        from the new instance's Decode at the next index. `moved` is True on the first chunk after
        a move. Raises RouteError when a stream ends without finishing; AioRpcError as it comes."""
        moved = False
        while True:
            migrated = last = None
            # The stream's reader is closed before its last chunk goes on (the caller stops there).
            async with contextlib.aclosing(self.outputs.follow(holder.call, holder.outputs, rr.request_id)) as chunks:
                async for chunk in chunks:
                    if chunk.HasField("migrated"):
                        migrated = worker_pb2.Migrated()
                        migrated.CopyFrom(chunk.migrated)
                        if chunk.token_ids:
                            yield chunk, moved
                            moved = False
                        break
                    if chunk.finished:
                        last = chunk
                        break
                    yield chunk, moved
                    moved = False
            if last is not None:
                yield last, moved
                return
            if migrated is None:
                raise WorkerLost(holder.instance_id, "stream_ended",
                                 f"instance {holder.instance_id} ended the stream before the request finished")
            call, sub = self.outputs.call(migrated.address, "Decode", worker_pb2.DecodeRequest(
                request_id=rr.request_id, start_index=migrated.next_index), self._stream_timeout(rr))
            rr.calls.remove(holder.call)
            rr.calls.append(call)
            holder.address, holder.instance_id, holder.call, holder.outputs = (migrated.address, migrated.instance_id,
                                                                               call, sub)
            holder.moves += 1
            moved = True

    # ---- colocated ----------------------------------------------------------------------------
    async def _colocated(self, rr: RoutedRequest, first: str | None = None):
        """The request whole on one instance: `first` when given (and it has room), else the
        freest colocated one."""
        tried: set[str] = set()

        def pick(pool, needed, ledger):
            preferred = next((c for c in pool if c.instance_id == first), None) if first else None
            if preferred is None and self.prefix_index is not None:
                return pick_by_prefix(pool, worker_pb2.ROLE_COLOCATED, len(rr.prompt_token_ids), needed, ledger,
                                      self._cached(rr, pool))
            return preferred or pick_colocated(pool, needed, ledger)
        for _ in range(self.retries + 1):
            placed = await self._place_queued(rr, worker_pb2.ROLE_COLOCATED, pick, tried, "colocated")
            if placed is None:
                break
            c, needed = placed
            rr.dispatched = rr.dispatched or time.monotonic()
            token = self.ledger.add(c.instance_id, blocks=needed, prompt_tokens=self._uncached(rr, c), running=1)
            call, sub = self.outputs.call(c.address, "Generate", rr.worker_request, self._stream_timeout(rr))
            rr.calls.append(call)
            holder = _Holder(c.address, c.instance_id, call, outputs=sub)
            sent = 0
            finished = False
            breakdown = None
            try:
                async for chunk, moved in self._follow(rr, holder):
                    if token is not None:
                        self.ledger.remove(token)
                        token = None
                    message = _from_chunk(rr.request_id, chunk)
                    if sent == 0:
                        message.prefill_instance = message.decode_instance = c.instance_id
                        breakdown = serving_pb2.TtftBreakdown(queue_s=chunk.queue_s, prefill_s=chunk.prefill_s)
                        _time_first_token(rr, breakdown)
                    if moved:
                        message.decode_instance = holder.instance_id
                    if chunk.finished:
                        finished = True
                        message.usage.CopyFrom(serving_pb2.Usage(
                            prompt_tokens=chunk.num_prompt_tokens, completion_tokens=chunk.index + len(chunk.token_ids),
                            cached_prompt_tokens=chunk.num_cached_tokens))
                        if breakdown is not None:
                            message.ttft_breakdown.CopyFrom(breakdown)
                    sent += len(chunk.token_ids)
                    yield message
                    if chunk.finished:
                        return
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and rr.aborted:
                    raise asyncio.CancelledError from None
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION and first and not sent and not holder.moves:
                    finished = True      # refused at the door: it holds nothing, and a late Release
                    raise _RoleChanged() from None   # would free the reservation of the retry
                if e.code() == grpc.StatusCode.UNAVAILABLE and (sent or holder.moves):
                    self.registry.mark_unreachable(holder.instance_id)
                    raise WorkerLost(holder.instance_id, "decode_lost",
                                     f"instance {holder.instance_id}: {e.details()}") from None
                if e.code() not in RETRY_CODES or sent or holder.moves:
                    raise RouteError(e.code(), f"instance {holder.instance_id}: {e.details()}") from None
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.registry.mark_unreachable(c.instance_id)
                tried.add(c.instance_id)
            finally:
                if token is not None:
                    self.ledger.remove(token)
                rr.calls.remove(holder.call)
                if not finished:
                    holder.call.cancel()
                    self.pool.release_later(holder.address, rr.request_id)
                    if holder.address != c.address:
                        self.pool.release_later(c.address, rr.request_id)
        raise RouteError(grpc.StatusCode.UNAVAILABLE, "no colocated instance could take the request; retry")


async def _reservation(call) -> tuple[grpc.StatusCode, str] | None:
    """None once the Decode stream `call` says its instance reserved (its initial metadata came);
    (code, details) when the stream ended first: the instance refused, or the call was cancelled."""
    await call.initial_metadata()
    if not call.done():
        return None
    code = await call.code()
    return None if code == grpc.StatusCode.OK else (code, await call.details())


def _check_reservation(rr: RoutedRequest, d, refusal: tuple[grpc.StatusCode, str] | None) -> None:
    """Raise what a refused reservation on d means for the request: _DecodeRefused (place it again),
    CancelledError (aborted), RouteError (a refusal no retry fixes). A no-op for None."""
    if refusal is None:
        return
    code, details = refusal
    if code == grpc.StatusCode.CANCELLED and rr.aborted:
        raise asyncio.CancelledError
    if code in RETRY_CODES:
        raise _DecodeRefused(code, details)
    raise RouteError(code, f"decode instance {d.instance_id}: {details}")


def _time_first_token(rr: RoutedRequest, breakdown: serving_pb2.TtftBreakdown) -> None:
    """Fill the router's parts of the TTFT breakdown as the first token leaves for the client."""
    now = time.monotonic()
    breakdown.ttft_s = now - rr.arrival
    breakdown.router_queue_s = (rr.dispatched or now) - rr.arrival
    breakdown.path_s = max(0.0, breakdown.ttft_s - breakdown.router_queue_s - breakdown.queue_s
                           - breakdown.prefill_s - breakdown.transfer_s)


def _from_chunk(request_id: str, chunk: worker_pb2.TokenChunk) -> serving_pb2.GenerateResponse:
    return serving_pb2.GenerateResponse(
        request_id=request_id, index=chunk.index, token_ids=chunk.token_ids, text=chunk.text,
        logprobs=chunk.logprobs, top_logprobs=chunk.top_logprobs, finished=chunk.finished,
        finish_reason=chunk.finish_reason)
