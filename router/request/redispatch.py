"""Requests outlive the worker that serves them (DESIGN "Request life" 7): exactly-once tokens
across a decode or prefill instance's death.

    async for message in Redispatcher(dispatcher).generate(rr): ...     # instead of dispatcher.generate

The router knows every token it sent the client (`delivered`). When the instance serving the
request is lost (dispatch.WorkerLost: its stream failed with UNAVAILABLE, e.g. SIGKILL, or ended
unfinished), the request is carried on under a new attempt id `<request_id>~r<n>` (no clash with
anything the dead attempt left on a surviving instance):

- nothing delivered yet: placed again from scratch (prefill elsewhere, transfer, decode). A prefill
  instance that dies during the prefill is already retried on another by Dispatcher._prefill; this
  covers the decode instance dying before the first token.
- a client resumes the request on another router, the one it ran on having died (GenerateRequest.
  resume: the tokens it has): the instances are asked for any attempt of the request they still
  hold; the newest one parked there (services/worker/parked.py: kept decoding for the orphan grace
  period) is attached to from the client's index, the rest released; if none is, it is recomputed
  as below under the next attempt id.
- tokens delivered: first, if the request migrated (or was migrating) and the surviving side
  already runs it, the router attaches there (Decode from index len(delivered)); otherwise a
  decode-capable instance gets Generate with output_token_ids = delivered and recomputes prompt +
  delivered (services/worker/redispatch_in.py). Its stream starts at index len(delivered), so the
  client's stream goes on at the next index with no token lost or repeated. Sampling is keyed by
  (seed, output index), so greedy and seeded requests produce what an uninterrupted run would.

Bounded: at most max_redispatches per request; then, or when no instance is left to take it, the
client gets UNAVAILABLE saying so. Each re-dispatch calls on_redispatch(reason) (metrics:
tandem_redispatches_total{reason}; reasons are WorkerLost.reason: decode_lost, stream_ended).
An Abort or client cancel reaches the current attempt (attempts share the request's call list).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from router.request.dispatch import Dispatcher, RouteError, RoutedRequest, WorkerLost, _from_chunk, _Holder
from router.request.placement import pick_colocated, pick_decode
from services.engine.blocks import cdiv
from tandem.v1 import serving_pb2, worker_pb2

log = logging.getLogger("tandem.router.redispatch")

DEFAULT_MAX_REDISPATCHES = 3          # re-dispatches of one request before the client gets UNAVAILABLE
PROBE_TIMEOUT_S = 2.0                 # a Stats probe for the surviving side of a migration


ATTEMPT_SEP = "~r"
PARK_WAIT_S = 2.0                     # a resumed request waits this long for its old attempt to be parked
PARK_POLL_S = 0.1


def attempt_id(request_id: str, attempt: int) -> str:
    """The id workers know attempt `attempt` (>= 1) of a request by."""
    return f"{request_id}{ATTEMPT_SEP}{attempt}"


def attempt_number(worker_id: str, request_id: str) -> int | None:
    """Which attempt of request_id the worker-side id is (0: the first), or None if of another request."""
    if worker_id == request_id:
        return 0
    prefix = request_id + ATTEMPT_SEP
    tail = worker_id[len(prefix):] if worker_id.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


@dataclasses.dataclass
class _Found:
    """An attempt of a resumed request that an instance holds."""
    attempt: int
    instance: object                  # its registry record
    request: worker_pb2.RunningRequest


class Redispatcher:
    def __init__(self, dispatcher: Dispatcher, *, max_redispatches: int = DEFAULT_MAX_REDISPATCHES,
                 on_redispatch: Callable[[str], None] = lambda reason: None):
        if max_redispatches < 0:
            raise ValueError(f"max_redispatches must be >= 0, got {max_redispatches}")
        self.dispatcher, self.max_redispatches, self.on_redispatch = dispatcher, max_redispatches, on_redispatch
        self._watched: set[_Watch] = set()          # requests in flight, for the missed-heartbeat check
        self._watcher: asyncio.Task | None = None

    async def generate(self, rr: RoutedRequest) -> AsyncIterator[serving_pb2.GenerateResponse]:
        """Dispatcher.generate(rr), resumed elsewhere after each WorkerLost (up to max_redispatches).
        Messages carry rr.request_id whatever attempt produced them; indexes stay contiguous."""
        delivered: list[int] = list(rr.resume_token_ids or ())
        lost: set[str] = set()
        if rr.resume_token_ids is None:
            current, attempt, first = rr, 0, 0
            stream = self.dispatcher.generate(rr)
        else:                           # its client lost the router that ran it (router death)
            found = await self._find_attempts(rr.request_id)
            attempt = first = max((a.attempt for a in found), default=0) + 1
            current = _attempt(rr, attempt, delivered)
            stream = self._failover(rr, current, delivered, found)
        watch = _Watch(rr)
        self._watched.add(watch)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="redispatch-watch")
        try:
            while True:
                try:
                    async with contextlib.aclosing(stream):
                        async for message in stream:
                            message.request_id = rr.request_id
                            delivered.extend(message.token_ids)
                            watch.saw(message)
                            yield message
                            if message.finished:
                                return
                    return
                except (RouteError, asyncio.CancelledError) as error:
                    e = error
                    if rr.aborted:
                        raise asyncio.CancelledError from None
                    if watch.fired is not None and _cancelled_by_watch(e):
                        e = WorkerLost(watch.fired, "heartbeat_missed", f"instance {watch.fired} stopped sending "
                                       f"tokens and its registry record expired")
                    if not isinstance(e, WorkerLost):
                        raise
                    watch.reset()
                    lost.add(e.instance_id)
                    if attempt - first >= self.max_redispatches:
                        raise RouteError(grpc.StatusCode.UNAVAILABLE, f"{e.message}; the request was re-dispatched "
                                         f"{attempt - first} times and lost its instance again; retry") from None
                    attempt += 1
                    self.on_redispatch(e.reason)
                    log.warning("request %s: %s (%s); re-dispatching attempt %d with %d tokens delivered",
                                rr.request_id, e.message, e.reason, attempt, len(delivered))
                    previous, current = current, _attempt(rr, attempt, delivered)
                    if delivered:
                        stream = self._resume(rr, previous.request_id, current, delivered, lost)
                    else:
                        stream = self.dispatcher.generate(current)
                finally:
                    rr.kv_fallback = rr.kv_fallback or current.kv_fallback
                    rr.dispatched = rr.dispatched or current.dispatched
        finally:
            self._watched.discard(watch)

    async def _watch(self) -> None:
        """Missed heartbeats, for every request in flight (one task): a holder that sent nothing
        for two registry polls and whose record is gone (expired: a hung or partitioned worker,
        whose stream may never fail) has the request's calls cancelled, which generate() turns into
        a re-dispatch (the CancelledError that a locally cancelled call raises, while the client's
        own task is not being cancelled). Ends when no request is left (generate() starts it again)."""
        registry = self.dispatcher.registry
        period = max(registry.poll_interval_s, 0.05)
        while self._watched:
            await asyncio.sleep(period)
            now = time.monotonic()
            for watch in list(self._watched):
                holder = watch.holder
                if (holder and watch.fired is None and now - watch.last_message > 2 * period
                        and registry.get(holder) is None):
                    watch.fired = holder
                    log.warning("request %s: %s is silent and left the registry; cancelling its stream",
                                watch.rr.request_id, holder)
                    for call in list(watch.rr.calls):
                        call.cancel()

    # ---- a client resumes after its router died: attach to the attempt that still runs -----------
    async def _find_attempts(self, request_id: str) -> list[_Found]:
        """Every attempt of request_id (request_id itself, or request_id~rN) that an instance still
        holds. An attempt that runs but is not parked yet (its worker has not seen the dead router's
        stream close) is probed again for up to PARK_WAIT_S, so the resume does not race the park."""
        d = self.dispatcher
        deadline = time.monotonic() + PARK_WAIT_S

        async def probe(inst) -> list[_Found]:
            try:
                s = await d.pool.stub(inst.address).Stats(worker_pb2.StatsRequest(list_requests=True),
                                                          timeout=PROBE_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return []
            return [_Found(n, inst, q) for q in s.requests if (n := attempt_number(q.request_id, request_id)) is not None]
        while True:
            found = [f for fs in await asyncio.gather(*(probe(i) for i in d.registry.instances(None))) for f in fs]
            if all(f.request.parked or not f.request.running for f in found) or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(PARK_POLL_S)

    async def _failover(self, rr: RoutedRequest, child: RoutedRequest, delivered: list[int], found: list[_Found]):
        """rr resumed by its client at len(delivered): attach to the newest parked attempt (a Decode
        from that index; the worker replays what it kept), releasing the others; else `child` (a new
        attempt id) recomputes prompt + delivered, or starts afresh when nothing was delivered."""
        best = max((f for f in found if f.request.parked), key=lambda f: f.attempt, default=None)
        for f in found:
            if f is not best:
                self.dispatcher.pool.release_later(f.instance.address, f.request.request_id)
        if best is not None:
            attach = dataclasses.replace(child, request_id=best.request.request_id)
            call, sub = self.dispatcher.outputs.call(best.instance.address, "Decode", worker_pb2.DecodeRequest(
                request_id=attach.request_id, start_index=len(delivered)), self.dispatcher._stream_timeout(rr))
            log.info("request %s: resumed at index %d on %s, which kept it running (its router died)",
                     rr.request_id, len(delivered), best.instance.instance_id)
            stream = self._stream(rr, attach, _Holder(best.instance.address, best.instance.instance_id, call,
                                                      outputs=sub))
            try:
                async with contextlib.aclosing(stream):
                    async for message in stream:
                        yield message
                return
            except _Refused as e:      # it finished, expired or was taken in between: recompute it
                log.info("request %s: %s could not be attached to (%s)", rr.request_id, best.instance.instance_id,
                         e.details)
                self.dispatcher.pool.release_later(best.instance.address, attach.request_id)
        log.info("request %s: resumed at index %d by recompute (no instance kept it)", rr.request_id, len(delivered))
        stream = self._recompute(rr, child, delivered, set()) if delivered else self.dispatcher.generate(child)
        async with contextlib.aclosing(stream):
            async for message in stream:
                yield message

    # ---- tokens delivered: attach to the surviving side, or recompute on another instance --------
    async def _resume(self, rr: RoutedRequest, previous_id: str, child: RoutedRequest, delivered: list[int],
                      lost: set[str]):
        survivor = await self._find_running(previous_id, len(delivered), lost)
        if survivor is not None:
            attach = dataclasses.replace(child, request_id=previous_id)
            call, sub = self.dispatcher.outputs.call(survivor.address, "Decode", worker_pb2.DecodeRequest(
                request_id=previous_id, start_index=len(delivered)), self.dispatcher._stream_timeout(rr))
            log.info("request %s: attached to %s, where it runs already (migrated)", rr.request_id,
                     survivor.instance_id)
            stream = self._stream(rr, attach, _Holder(survivor.address, survivor.instance_id, call, outputs=sub))
            try:
                async with contextlib.aclosing(stream):
                    async for message in stream:
                        yield message
                return
            except _Refused as e:      # it finished or left in between: recompute it instead
                log.info("request %s: %s could not be attached to (%s)", rr.request_id, survivor.instance_id,
                         e.details)
        async with contextlib.aclosing(self._recompute(rr, child, delivered, lost)) as stream:
            async for message in stream:
                yield message

    async def _find_running(self, worker_id: str, next_index: int, lost: set[str]):
        """The decode-capable instance (not lost) running worker_id with at least next_index
        outputs: the side of a migration that committed before the source died. None if none."""
        d = self.dispatcher
        candidates = [i for i in d.registry.instances(None) if i.instance_id not in lost
                      and i.role in (worker_pb2.ROLE_DECODE, worker_pb2.ROLE_COLOCATED)]

        async def runs(inst) -> bool:
            try:
                s = await d.pool.stub(inst.address).Stats(worker_pb2.StatsRequest(list_requests=True),
                                                          timeout=PROBE_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return False
            return any(q.request_id == worker_id and q.num_output_tokens >= next_index for q in s.requests)
        found = await asyncio.gather(*(runs(i) for i in candidates))
        return next((i for i, ok in zip(candidates, found) if ok), None)

    async def _recompute(self, rr: RoutedRequest, child: RoutedRequest, delivered: list[int], lost: set[str]):
        """child on a decode-capable instance that recomputes prompt + delivered; instances that
        refuse before any token (full, draining, role changed) are passed over, and while every one
        is full the request waits (the dispatcher's queue_timeout_s)."""
        d = self.dispatcher
        tried = set(lost)
        waited_until = time.monotonic() + d.queue_timeout_s
        while True:
            _, decode, colocated = d.pools()
            pool, pick = (decode, pick_decode) if decode else (colocated, pick_colocated)
            pool = [i for i in pool if i.instance_id not in tried]
            if not pool:
                raise RouteError(grpc.StatusCode.UNAVAILABLE, f"request {rr.request_id}: no decode instance is left "
                                 f"to resume it on after {len(delivered)} tokens (lost: {', '.join(sorted(lost))}); "
                                 f"start a decode worker, then retry")
            needed = cdiv(len(rr.prompt_token_ids) + len(delivered), max(1, pool[0].block_size))
            inst = pick(pool, needed, d.ledger)
            if inst is None:
                if time.monotonic() >= waited_until or d._timeout(rr) <= d.queue_poll_s:
                    raise RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request {rr.request_id}: every decode "
                                     f"instance is full ({needed} KV blocks needed to resume it); retry later")
                await asyncio.sleep(d.queue_poll_s)
                continue
            token = d.ledger.add(inst.instance_id, blocks=needed, running=1)
            call, sub = d.outputs.call(inst.address, "Generate", child.worker_request, d._stream_timeout(rr))
            refused = None
            stream = self._stream(rr, child, _Holder(inst.address, inst.instance_id, call, outputs=sub),
                                  on_first=lambda: d.ledger.remove(token))
            try:
                async with contextlib.aclosing(stream):
                    async for message in stream:
                        yield message
                return
            except _Refused as e:
                refused = e
            finally:
                d.ledger.remove(token)
            tried.add(inst.instance_id)
            if refused.code == grpc.StatusCode.UNAVAILABLE:
                d.registry.mark_unreachable(inst.instance_id)
            log.info("request %s: %s refused to resume it (%s); trying another", rr.request_id, inst.instance_id,
                     refused.details)

    async def _stream(self, rr: RoutedRequest, child: RoutedRequest, holder: _Holder,
                      on_first: Callable[[], None] = lambda: None):
        """Client messages from holder's stream (and where it migrates to), which starts at the
        index the client is at.
        Raises _Refused when the instance refuses before any token, WorkerLost when it is lost,
        RouteError otherwise; releases what it may hold on any unfinished exit."""
        d = self.dispatcher
        child.calls.append(holder.call)
        first_address, sent, finished = holder.address, 0, False
        try:
            async for chunk, moved in d._follow(child, holder):
                if sent == 0:
                    on_first()
                message = _from_chunk(rr.request_id, chunk)
                if sent == 0 or moved:
                    message.decode_instance = holder.instance_id
                sent += len(chunk.token_ids) or 1
                if chunk.finished:
                    finished = chunk.finish_reason != serving_pb2.FINISH_REASON_ABORT
                    message.usage.CopyFrom(serving_pb2.Usage(prompt_tokens=len(rr.prompt_token_ids),
                                                             completion_tokens=chunk.index + len(chunk.token_ids)))
                yield message
                if chunk.finished:
                    return
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and rr.aborted:
                raise asyncio.CancelledError from None
            if not sent and not holder.moves and e.code() in _PASS_OVER:
                raise _Refused(e.code(), e.details()) from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                d.registry.mark_unreachable(holder.instance_id)
                raise WorkerLost(holder.instance_id, "decode_lost",
                                 f"instance {holder.instance_id}: {e.details()}") from None
            raise RouteError(e.code(), f"instance {holder.instance_id} resuming {rr.request_id}: {e.details()}") \
                from None
        finally:
            child.calls.remove(holder.call)
            if not finished:
                holder.call.cancel()
                d.pool.release_later(holder.address, child.request_id)
                if holder.address != first_address:
                    d.pool.release_later(first_address, child.request_id)


def _cancelled_by_watch(e: BaseException) -> bool:
    """Whether e is what cancelling the request's calls (_watch) raised: CancelledError from a
    locally cancelled call while this task itself is not being cancelled (the client is still
    there), or a CANCELLED status."""
    if isinstance(e, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and not task.cancelling()
    return isinstance(e, RouteError) and e.code == grpc.StatusCode.CANCELLED


class _Watch:
    """What generate() saw of the current attempt of rr, for _watch."""

    def __init__(self, rr: RoutedRequest):
        self.rr = rr
        self.holder: str | None = None       # the instance the tokens come from now
        self.last_message = time.monotonic()
        self.fired: str | None = None        # the holder whose calls _watch cancelled

    def saw(self, message: serving_pb2.GenerateResponse) -> None:
        self.last_message = time.monotonic()
        if message.decode_instance:
            self.holder = message.decode_instance

    def reset(self) -> None:
        self.holder, self.fired, self.last_message = None, None, time.monotonic()


# Refusals before any token after which another instance is tried (draining, full, role changed,
# unreachable, an id still in use there).
_PASS_OVER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND)


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


def _attempt(rr: RoutedRequest, attempt: int, delivered: list[int]) -> RoutedRequest:
    """Attempt `attempt` of rr: its own worker id, the delivered tokens as output_token_ids, and
    rr's call list (so an Abort of rr cancels it too)."""
    wr = worker_pb2.WorkerRequest()
    wr.CopyFrom(rr.worker_request)
    wr.request_id = attempt_id(rr.request_id, attempt)
    wr.output_token_ids[:] = delivered
    return dataclasses.replace(rr, request_id=wr.request_id, worker_request=wr, calls=rr.calls)
