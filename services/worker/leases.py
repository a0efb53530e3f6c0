"""Decode-side reservations: blocks held for a request whose KV is on its way.

A lease goes PENDING → ADOPTED (the KV committed, or the router asked to recompute it because
the KV transfer failed; the request decodes) or PENDING → RELEASED (deadline passed, prefill
failed, request cancelled). A released lease has had its blocks freed and the KV receiver told to
forget the request, so nothing writes into those blocks again; so has a lease adopted by recompute
(the engine frees its reservation and recomputes into blocks of its own).
The commit runs on a KV receiver thread, a recompute on a worker thread and the rest on the asyncio
loop; one lock orders them, so a lease is adopted or released exactly once, never both.
"""
from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.engine.sampling_params import SamplingParams


class LeaseState(enum.Enum):
    PENDING = "pending"
    ADOPTED = "adopted"
    RELEASED = "released"


@dataclass
class Lease:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    block_ids: list[int]
    deadline: float                       # time.monotonic()
    loop: asyncio.AbstractEventLoop
    state: LeaseState = LeaseState.PENDING
    reason: str = ""                      # why it was released
    expired: bool = False                 # released because the deadline passed
    stream: object = None                 # the engine stream once adopted
    output_token_ids: list[int] = field(default_factory=list)
    committed_at: float = 0.0
    settled: asyncio.Event = field(default_factory=asyncio.Event)   # set on adoption or release
    timer: asyncio.TimerHandle | None = None


class LeaseNotFound(LookupError):
    """Recompute: no lease for the request here (never reserved, or already claimed by Decode)."""


class LeaseReleased(RuntimeError):
    """Recompute: the lease was released (expired, cancelled) before the request could be adopted."""


class LeaseTable:
    """The worker's live leases.

    adopt_fn(lease, meta, recompute) starts decoding (EngineThread.adopt) and returns the stream;
    it runs under the lock (on the receiver thread for a commit, with recompute=False). meta holds
    first_token_id and first_logprob (None when not asked). release_fn(lease) frees the blocks and
    makes the receiver forget the request; it runs on the asyncio loop after the state flipped.
    forget_fn(request_id) makes the receiver forget the request (KVReceiver.forget: blocking).
    """

    def __init__(self, adopt_fn: Callable[[Lease, dict, bool], object],
                 release_fn: Callable[[Lease], "asyncio.Future"], forget_fn: Callable[[str], None]):
        self._adopt_fn, self._release_fn, self._forget_fn = adopt_fn, release_fn, forget_fn
        self._expiring: set[asyncio.Task] = set()
        self.attach_timeout_s = 30.0     # an adopted request nobody decodes for is aborted after this
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._leases)

    def get(self, request_id: str) -> Lease | None:
        return self._leases.get(request_id)

    @property
    def reserved_blocks(self) -> int:
        with self._lock:
            return sum(len(x.block_ids) for x in self._leases.values() if x.state == LeaseState.PENDING)

    def add(self, lease: Lease) -> None:
        """Track a new lease (its blocks are already reserved) and arm its deadline (asyncio loop)."""
        with self._lock:
            if lease.request_id in self._leases:
                raise ValueError(f"request_id {lease.request_id!r} already holds a lease here; use a unique id")
            self._leases[lease.request_id] = lease
        delay = max(0.0, lease.deadline - time.monotonic())
        lease.timer = lease.loop.call_later(delay, self._expire, lease.request_id)

    def commit(self, request_id: str, num_tokens: int, meta: dict) -> str | None:
        """The KV receiver saw every byte (receiver thread). None acknowledges; a string refuses."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.state != LeaseState.PENDING:
                return f"no pending lease for {request_id!r} on this instance ({lease.reason if lease else 'unknown'})"
            if time.monotonic() > lease.deadline:
                return f"the lease for {request_id!r} expired before its KV arrived"
            if num_tokens != len(lease.prompt_token_ids):
                return f"KV covers {num_tokens} tokens but the reservation is for {len(lease.prompt_token_ids)}"
            try:
                lease.stream = self._adopt_fn(lease, meta, False)
            except Exception as e:            # the engine stopped: refuse, the release path frees
                return f"could not start decoding: {e}"
            lease.state, lease.committed_at = LeaseState.ADOPTED, time.monotonic()
            lease.output_token_ids = [int(meta["first_token_id"])]
        lease.loop.call_soon_threadsafe(self._adopted, lease)
        return None

    def recompute(self, request_id: str, meta: dict) -> bool:
        """The KV of a pending lease will not come (its transfer failed): adopt the request without
        it. The receiver forgets the request first, so no byte lands in its blocks afterwards; then
        the engine frees the reservation and queues the request to recompute prompt + first token
        (meta: first_token_id, first_logprob as in commit). Blocking: call off the asyncio loop
        (forget waits for a frame being written, bounded by the receive timeout).

        Returns True when this call adopted the request, False when it was adopted already (a late
        KV commit won the race, or a repeated call): both leave it decoding, once. Raises
        LeaseNotFound when there is no lease for it here, LeaseReleased when it was released, and
        whatever adopt_fn raises (the engine stopped; the lease stays pending and the release path
        frees it).
        """
        # Outside the lock: forget may wait for a frame being written, and the asyncio loop takes
        # this lock. A commit already past the receiver races for the lock below; either wins once.
        self._forget_fn(request_id)
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                raise LeaseNotFound(f"request {request_id!r} has no reservation on this instance (never reserved, "
                                    f"or its Decode stream took it already); Reserve first")
            if lease.state == LeaseState.ADOPTED:
                return False
            if lease.state == LeaseState.RELEASED:
                raise LeaseReleased(f"the reservation for request {request_id!r} was released ({lease.reason}); "
                                    f"dispatch the request again")
            lease.stream = self._adopt_fn(lease, meta, True)
            lease.state, lease.committed_at = LeaseState.ADOPTED, time.monotonic()
            lease.output_token_ids = [int(meta["first_token_id"])]
        lease.loop.call_soon_threadsafe(self._adopted, lease)
        return True

    def add_adopted(self, lease: Lease) -> None:
        """Track a request that started decoding by another path (a committed migration) so that
        Decode claims it like any adopted lease. Any thread; the attach timeout starts now."""
        with self._lock:
            if lease.request_id in self._leases:
                raise ValueError(f"request_id {lease.request_id!r} already holds a lease here")
            lease.state, lease.committed_at = LeaseState.ADOPTED, time.monotonic()
            self._leases[lease.request_id] = lease
        lease.loop.call_soon_threadsafe(self._adopted, lease)

    async def release(self, request_id: str, reason: str, expired: bool = False) -> bool:
        """Release a pending lease (blocks freed, receiver forgets). Returns False when there was
        no pending lease (unknown, or already adopted: the caller aborts the running request)."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.state != LeaseState.PENDING:
                return False
            lease.state, lease.reason, lease.expired = LeaseState.RELEASED, reason, expired
        self._settled(lease)
        # Shielded: a cancelled caller (e.g. a Release RPC that timed out) must not stop the
        # blocks from being freed half-way.
        task = asyncio.ensure_future(self._release_fn(lease))
        task.add_done_callback(lambda _: self._leases.pop(request_id, None))
        await asyncio.shield(task)
        return True

    def claim(self, request_id: str) -> Lease | None:
        """Take an adopted lease out of the table (Decode attaches to its stream); None otherwise."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.state != LeaseState.ADOPTED:
                return None
            del self._leases[request_id]
        if lease.timer is not None:
            lease.timer.cancel()
        return lease

    def pending_ids(self) -> list[str]:
        with self._lock:
            return [k for k, v in self._leases.items() if v.state == LeaseState.PENDING]

    # ---- asyncio loop ---------------------------------------------------------------------
    def _settled(self, lease: Lease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
        lease.settled.set()

    def _adopted(self, lease: Lease) -> None:
        """Decoding started; if nobody claims the stream within the attach timeout, abort it."""
        self._settled(lease)
        lease.timer = lease.loop.call_later(self.attach_timeout_s, self._unclaimed, lease.request_id)

    def _unclaimed(self, request_id: str) -> None:
        lease = self.claim(request_id)
        if lease is not None:
            lease.stream.cancel()

    def _expire(self, request_id: str) -> None:
        lease = self._leases.get(request_id)
        if lease is not None and lease.state == LeaseState.PENDING:
            task = lease.loop.create_task(self.release(request_id, "lease expired before the KV arrived", expired=True))
            self._expiring.add(task)                 # the loop holds tasks weakly
            task.add_done_callback(self._expiring.discard)
