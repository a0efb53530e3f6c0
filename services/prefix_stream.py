"""A worker's prefix cache, told to routers through Redis: full state once, then diffs.

Key (read by router/cluster/prefix_index.py):

    tandem:{cluster}:prefix:{instance_id}     a Redis stream; every entry has the fields
        epoch   this worker process's incarnation (a random hex string, new on every start)
        kind    b"full" (hashes = everything cached now) or b"diff" (add = stored, del = evicted)
        add/del the block hashes (services/engine/kv_cache.py prefix_block_hashes), packed <Q
        bs      the block size the hashes were taken at

Invariant the reader relies on: the stream's first entry is always a `full` one. The publisher
deletes the stream when it starts (a restarted worker leaves no stale entry behind), writes a full
entry, and after every later full entry (a compaction, or a resync after a Redis outage or an event
overflow) trims everything before it. So a reader that follows entry by entry only ever needs the
entries after the last one it applied: if some were trimmed away, a newer full entry is among the
rest. Diffs are written with NOMKSTREAM, so a stream that expired is re-created only by a full entry.

For the worker Redis is advisory, as for the load report: no method raises on a Redis error; it
logs once and publishes a full entry once Redis answers again.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from services.async_tasks import stop_task
from services.engine.kv_cache import PrefixEvent
from services.registry import REDIS_DOWN, connect

log = logging.getLogger(__name__)

FULL, DIFF = b"full", b"diff"


def prefix_key(cluster: str, instance_id: str) -> str:
    return f"tandem:{cluster}:prefix:{instance_id}"


def pack_hashes(hashes: Iterable[int]) -> bytes:
    hashes = list(hashes)
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def unpack_hashes(data: bytes | None) -> list[int]:
    if not data:
        return []
    if len(data) % 8:
        raise ValueError(f"packed hashes of {len(data)} bytes, not a multiple of 8")
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def net_changes(events: Iterable[PrefixEvent]) -> tuple[list[int], list[int]]:
    """(added, removed) after applying `events` in order: a hash stored then evicted within the
    batch counts as removed (removing one the reader never saw is a no-op there)."""
    last: dict[int, bool] = {}
    for e in events:
        last[e.block_hash] = e.stored
    return [h for h, s in last.items() if s], [h for h, s in last.items() if not s]


class PrefixPublisher:
    """Mirrors one engine's prefix cache into its Redis stream between start() and stop().

    events: the KV manager's `prefix_events` deque (record_prefix_events() called), drained here.
    snapshot: async, returns the manager's prefix_snapshot() taken on the thread that owns it.
    Every interval_s the pending events go out as one diff; every compact_every diffs (and after
    any failure or gap in the events' seq) a full entry replaces the stream's history instead.
    """

    def __init__(self, redis_url: str, cluster: str, instance_id: str, block_size: int,
                 events: deque, snapshot: Callable[[], Awaitable[tuple[int, list[int]]]], *,
                 interval_s: float = 0.02, compact_every: int = 256, ttl_s: float = 60.0):
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"need 0 < interval_s < ttl_s, got interval_s={interval_s} ttl_s={ttl_s}")
        self._url, self.key, self.block_size = redis_url, prefix_key(cluster, instance_id), block_size
        self._events, self._snapshot = events, snapshot
        self.interval_s, self.compact_every, self.ttl_s = interval_s, compact_every, ttl_s
        self.epoch = os.urandom(8).hex().encode()
        self._redis = None
        self._task: asyncio.Task | None = None
        self._need_full = True
        self._last_seq = 0                 # events up to this seq are in the stream
        self._diffs = 0                    # diff entries since the last full one
        self._expire_at = 0.0              # loop time after which the key's TTL is refreshed
        self._failing = False
        self._lock = asyncio.Lock()        # one flush at a time: entries go out in event order
        self.entries_written = 0           # for tests and logs

    async def start(self) -> None:
        """Drop any stream a previous incarnation left, publish the full state, keep following."""
        self._redis = connect(self._url, timeout_s=2.0)
        with contextlib.suppress(*REDIS_DOWN):
            await self._redis.delete(self.key)
        await self.flush()
        self._task = asyncio.create_task(self._loop(), name=f"prefix-publisher-{self.key}")

    async def stop(self) -> None:
        """Stop publishing and delete the stream (routers drop this instance's entries). Never
        raises; safe to call twice."""
        await stop_task(self._task)
        self._task = None
        if self._redis is not None:
            with contextlib.suppress(*REDIS_DOWN):
                await self._redis.delete(self.key)
            with contextlib.suppress(*REDIS_DOWN):
                await self._redis.aclose()
            self._redis = None

    async def flush(self) -> bool:
        """Publish what changed since the last call (a full entry when one is due). True when the
        stream is now up to date; False if Redis failed (retried on the next call)."""
        async with self._lock:
            return await self._flush()

    async def _flush(self) -> bool:
        try:
            if self._need_full or self._diffs >= self.compact_every:
                await self._publish_full()
            else:
                await self._publish_diff()
            await self._refresh_ttl()
        except REDIS_DOWN as e:
            if not self._failing:
                log.warning("%s: cannot publish prefix-cache events (%s); will resend the full state", self.key, e)
            self._failing, self._need_full = True, True
            return False
        if self._failing:
            log.info("%s: prefix-cache events reach Redis again (full state sent)", self.key)
        self._failing = False
        return True

    async def _publish_full(self) -> None:
        self._need_full = True             # stays so until the entry is written
        seq, hashes = await self._snapshot()
        while self._events and self._events[0].seq <= seq:     # already in the snapshot
            self._events.popleft()
        entry_id = await self._redis.xadd(self.key, {b"epoch": self.epoch, b"kind": FULL, b"bs": self.block_size,
                                                     b"add": pack_hashes(hashes)})
        await self._redis.xtrim(self.key, minid=entry_id, approximate=False)
        self._last_seq, self._diffs, self._need_full = seq, 0, False
        self.entries_written += 1

    async def _publish_diff(self) -> None:
        batch = []
        while self._events:
            batch.append(self._events.popleft())
        if not batch:
            return
        if batch[0].seq != self._last_seq + 1:      # events were dropped (overflow): resync
            log.warning("%s: %d prefix events lost; sending the full state", self.key,
                        batch[0].seq - self._last_seq - 1)
            self._need_full = True
            return await self._publish_full()
        self._need_full = True             # the batch is popped: only a full entry can repair a failure now
        added, removed = net_changes(batch)
        written = await self._redis.xadd(self.key, {b"epoch": self.epoch, b"kind": DIFF, b"bs": self.block_size,
                                                    b"add": pack_hashes(added), b"del": pack_hashes(removed)},
                                         nomkstream=True)
        if written is None:                # the stream expired or was deleted: start it again
            return await self._publish_full()
        self._last_seq, self._need_full = batch[-1].seq, False
        self._diffs += 1
        self.entries_written += 1

    async def _refresh_ttl(self) -> None:
        now = asyncio.get_running_loop().time()
        if now >= self._expire_at:
            await self._redis.pexpire(self.key, int(self.ttl_s * 1000))
            self._expire_at = now + self.ttl_s / 4

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:              # a bug here must not end the worker: log and resync
                log.exception("%s: prefix-cache publishing failed", self.key)
                self._need_full = True
