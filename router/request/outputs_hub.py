"""The router's end of the workers' Outputs streams (services/worker/output_sinks.py).

One Outputs stream per worker carries the tokens of every request this router streams from that
worker, a step's chunks in one message; each request's own stream then carries only its last chunk
(finished, or migrated), whose `muxed_chunks` says how many came the other way. `follow` merges the
two back into the one ordered stream the dispatcher reads, as if it had all come on the request's.

    call, sub = hub.call(address, "Decode", request, timeout)   # asks the worker to use the hub
    async for chunk in hub.follow(call, sub, request_id):        # every chunk, in order
        ...

A subscription opens when the worker registers (`watch`, from the registry) or on its first call,
and lives while the worker is registered; a call made before the worker opened it simply streams
everything itself. When a subscription ends (the worker died or stops, the channel closed), a
request that was reading from it finishes if every chunk its last one counts had arrived, else
fails UNAVAILABLE, as its own stream would, and the dispatcher re-dispatches it; the next call
opens a new subscription.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from services.worker.call_metadata import OUTPUTS_KEY
from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.router.outputs")
RETRY_S = 1.0              # after a subscription failed, calls to that worker stream directly this long
ORPHAN_TTL_S = 10.0        # chunks no follower claimed (it had not started yet, or it ended) live this long
_MUX, _CALL, _DEAD = 0, 1, 2


class _Route:
    """What one follower waits on: its chunks from the hub, its own stream's reads, or the end."""
    __slots__ = ("queue",)

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, kind: int, value) -> None:
        self.queue.put_nowait((kind, value))

    def from_call(self, future: asyncio.Future) -> None:
        self.queue.put_nowait((_CALL, future))


class OutputsHub:
    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self._prefix = f"router-{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count(1)
        self._subs: dict[str, str] = {}                  # address → its open subscription's id
        self._tasks: dict[str, asyncio.Task] = {}        # subscription id → its reader
        self._retry_at: dict[str, float] = {}            # address → no new subscription before
        self._routes: dict[tuple[str, str], _Route] = {}  # (subscription id, request id) → follower
        self._orphans: dict[tuple[str, str], list] = {}
        self._orphans_since: dict[tuple[str, str], float] = {}
        self._purged_at = 0.0

    @property
    def followers(self) -> int:
        return len(self._routes)

    @property
    def subscriptions(self) -> int:
        return len(self._tasks)

    def watch(self, addresses: set[str]) -> None:
        """Keep a subscription open to each of `addresses` (the registered workers), so that their
        first requests use it too. A worker that left keeps its subscription for the requests
        reading it (their own stream's fate, or the router's missed-heartbeat watch, decides
        theirs; the closing channel ends it), while new calls to its address, should it come
        back, open a new one."""
        for address in list(self._subs):
            if address not in addresses:
                del self._subs[address]
        for address in addresses:
            self._subscription(address)

    def call(self, address: str, method: str, request, timeout: float | None):
        """(call, subscription id or "") of worker stream RPC `method` ("Decode", "Generate") on
        `address`, asking the worker to send its chunks through this hub when one is open."""
        sub = self._subscription(address)
        metadata = ((OUTPUTS_KEY, sub),) if sub else None
        return getattr(self.pool.stub(address), method)(request, timeout=timeout, metadata=metadata), sub

    def _subscription(self, address: str) -> str:
        sub = self._subs.get(address)
        if sub is None and time.monotonic() >= self._retry_at.get(address, 0.0):
            sub = f"{self._prefix}-{next(self._ids)}"
            self._subs[address] = sub
            self._tasks[sub] = asyncio.ensure_future(self._read(address, sub))
        return sub or ""

    async def _read(self, address: str, sub: str) -> None:
        """The subscription's reader: hands each chunk to its follower (or keeps it a while)."""
        why = "it ended"
        try:
            call = self.pool.stub(address).Outputs(worker_pb2.OutputsRequest(id=sub))
            async for batch in call:
                routes = self._routes
                for chunk in batch.chunks:
                    key = (sub, chunk.request_id)
                    route = routes.get(key)
                    if route is not None:
                        route.put(_MUX, chunk)
                    else:
                        self._orphan(key, chunk)
        except grpc.aio.AioRpcError as e:
            why = f"{e.code().name}: {e.details()}"
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:       # an older worker: never ask it again
                self._retry_at[address] = float("inf")
        except asyncio.CancelledError:
            why = "the router is stopping"
        finally:
            if self._subs.get(address) == sub:
                del self._subs[address]
            self._tasks.pop(sub, None)
            self._retry_at[address] = max(self._retry_at.get(address, 0.0), time.monotonic() + RETRY_S)
            for key in [k for k in self._orphans if k[0] == sub]:
                self._orphans.pop(key)
                self._orphans_since.pop(key, None)
            failed = [route for key, route in self._routes.items() if key[0] == sub]
            for route in failed:
                route.put(_DEAD, f"the Outputs stream from {address} closed ({why})")
            log.log(logging.INFO if failed else logging.DEBUG, "Outputs stream %s from %s closed (%s); %d "
                    "requests reading it fail", sub, address, why, len(failed))

    def _orphan(self, key: tuple[str, str], chunk) -> None:
        now = time.monotonic()
        self._orphans.setdefault(key, []).append(chunk)
        self._orphans_since.setdefault(key, now)
        if now - self._purged_at > ORPHAN_TTL_S / 2:
            self._purged_at = now
            for old in [k for k, t in self._orphans_since.items() if now - t > ORPHAN_TTL_S]:
                self._orphans.pop(old, None)
                self._orphans_since.pop(old, None)

    async def follow(self, call, sub: str, request_id: str) -> AsyncIterator[worker_pb2.TokenChunk]:
        """Every chunk of `call` (made by `call()` with subscription `sub`), in order, until its
        stream ends: those that came through the subscription, then its last one. Raises what
        reading `call` raises, and AioRpcError UNAVAILABLE when the subscription ended before the
        chunks the last one counts arrived (a worker whose subscription closes under a stream
        ends that stream UNAVAILABLE itself at its next chunk)."""
        if not sub:
            async for chunk in call:
                yield chunk
            return
        key, route = (sub, request_id), _Route()
        self._routes[key] = route
        for chunk in self._orphans.pop(key, ()):
            route.put(_MUX, chunk)
        self._orphans_since.pop(key, None)
        if sub not in self._tasks:
            route.put(_DEAD, f"the Outputs stream {sub} closed")
        pending: asyncio.Future | None = None

        def read() -> None:
            nonlocal pending
            pending = asyncio.ensure_future(call.read())
            pending.add_done_callback(route.from_call)
        try:
            read()
            received, last, dead = 0, None, None
            while True:
                kind, value = await route.queue.get()
                if kind == _MUX:
                    received += 1
                    yield value
                elif kind == _DEAD:         # nothing more comes that way; the last chunk says if any was lost
                    dead = value
                else:
                    chunk = value.result()
                    if chunk is grpc.aio.EOF:
                        return
                    if not (chunk.finished or chunk.HasField("migrated")):
                        yield chunk             # the worker streams this call itself
                        read()
                        continue
                    last = chunk
                if last is not None and received >= last.muxed_chunks:
                    yield last
                    return
                if last is not None and dead is not None:
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                               details=f"request {request_id}: {dead} after {received} of its "
                                                       f"{last.muxed_chunks} chunks")
        finally:
            if self._routes.get(key) is route:
                del self._routes[key]
            if pending is not None and not pending.done():
                pending.cancel()

    async def close(self) -> None:
        """Stop every subscription's reader (their followers fail)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
