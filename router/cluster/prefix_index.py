"""Which instance holds which prefix-cache block: the router's copy of every worker's cache.

PrefixIndex is the pure part (block hash → instances); PrefixIndexFollower keeps it in step with
the workers' Redis streams (services/prefix_stream.py: a full entry, then diffs). Placement asks
`overlap(prefix_block_hashes(prompt, block_size))` for each instance's cached leading blocks.

Freshness: a worker publishes within ~20 ms of a change and the follower blocks on XREAD, so the
index trails the workers by a few tens of ms. An instance that leaves the registry (stopped, or its
record expired) is dropped at once; a restarted one starts over from its new full entry.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence

from services.async_tasks import stop_task
from services.engine.kv_cache import prefix_block_hashes
from services.prefix_stream import FULL, prefix_key, unpack_hashes
from services.registry import REDIS_DOWN, connect

log = logging.getLogger(__name__)


class PrefixIndex:
    """block hash → the instances holding it, and the reverse. For one asyncio loop (no locking)."""

    def __init__(self):
        self._holders: dict[int, set[str]] = {}
        self._held: dict[str, set[int]] = {}

    def replace(self, instance_id: str, hashes: Iterable[int]) -> None:
        """The instance holds exactly `hashes` now (a full entry)."""
        self.drop(instance_id)
        self.apply(instance_id, hashes, ())

    def apply(self, instance_id: str, added: Iterable[int], removed: Iterable[int]) -> None:
        """A diff: `added` are cached on the instance now, `removed` no longer. Removing a hash it
        was not known to hold is a safe no-op."""
        held = self._held.setdefault(instance_id, set())
        for h in removed:
            if h in held:
                held.discard(h)
                holders = self._holders[h]
                holders.discard(instance_id)
                if not holders:
                    del self._holders[h]
        for h in added:
            if h not in held:
                held.add(h)
                self._holders.setdefault(h, set()).add(instance_id)

    def drop(self, instance_id: str) -> None:
        """Forget the instance (no-op if unknown)."""
        self.apply(instance_id, (), list(self._held.get(instance_id, ())))
        self._held.pop(instance_id, None)

    def hashes(self, instance_id: str) -> set[int]:
        """A copy of what the instance is known to hold (empty if unknown)."""
        return set(self._held.get(instance_id, ()))

    def instances(self) -> list[str]:
        return sorted(self._held)

    def overlap(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """instance → how many leading blocks of `block_hashes` (a prefix_block_hashes chain) it
        holds; instances holding none are absent."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(block_hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for instance_id in alive:
                out[instance_id] = i + 1
        return out

    def check_integrity(self) -> None:
        """Raises AssertionError unless the two maps mirror each other."""
        mirrored: dict[int, set[str]] = {}
        for instance_id, held in self._held.items():
            for h in held:
                mirrored.setdefault(h, set()).add(instance_id)
        if mirrored != self._holders:
            raise AssertionError("prefix index: hash → instances does not mirror instance → hashes")


class PrefixIndexFollower:
    """Follows the prefix streams of the instances `instance_ids()` names (the registry's view)
    into `index` between start() and stop(). Never raises on a Redis error: it logs once, keeps
    the index as it is and goes on from where it was once Redis answers."""

    def __init__(self, redis_url: str, cluster: str, index: PrefixIndex,
                 instance_ids: Callable[[], Iterable[str]], *, block_ms: int = 100, check_interval_s: float = 2.0):
        self._url, self.cluster, self.index = redis_url, cluster, index
        self._instance_ids, self.block_ms, self.check_interval_s = instance_ids, block_ms, check_interval_s
        self._last_id: dict[str, bytes] = {}       # instance → id of the last entry applied (b"0": none)
        self._epoch: dict[str, bytes] = {}         # instance → epoch of the full entry applied
        self.block_size: dict[str, int] = {}       # instance → block size of its hashes
        self._redis = None
        self._task: asyncio.Task | None = None
        self._failing = False
        self._next_check = 0.0
        self._lock = asyncio.Lock()                # one poll at a time: entries are applied in order
        self.entries_applied = 0

    async def start(self) -> None:
        self._redis = connect(self._url, timeout_s=max(2.0, 2 * self.block_ms / 1000))
        await self.poll(block=False)
        self._task = asyncio.create_task(self._loop(), name="prefix-index-follower")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        if self._redis is not None:
            with contextlib.suppress(*REDIS_DOWN):
                await self._redis.aclose()
            self._redis = None

    def _track(self) -> None:
        live = set(self._instance_ids())
        for gone in set(self._last_id) - live:
            self._forget(gone)
        for new in live - set(self._last_id):
            self._last_id[new] = b"0"

    def _forget(self, instance_id: str) -> None:
        self.index.drop(instance_id)
        self._last_id.pop(instance_id, None)
        self._epoch.pop(instance_id, None)
        self.block_size.pop(instance_id, None)

    def _resync(self, instance_id: str) -> None:
        """Read the instance's stream from its start again (it begins with a full entry)."""
        self._last_id[instance_id] = b"0"
        self._epoch.pop(instance_id, None)

    async def poll(self, block: bool = True) -> int:
        """Apply what the streams hold beyond what was applied (waiting up to block_ms for news when
        `block`). Returns the number of entries applied; 0 on a Redis error (logged once)."""
        async with self._lock:
            return await self._poll(block)

    async def _poll(self, block: bool) -> int:
        self._track()
        if not self._last_id:
            if block:
                await asyncio.sleep(self.block_ms / 1000)
            return 0
        try:
            await self._check_epochs()
            streams = {prefix_key(self.cluster, i): last for i, last in self._last_id.items()}
            answer = await self._redis.xread(streams, block=self.block_ms if block else None, count=10_000)
        except REDIS_DOWN as e:
            if not self._failing:
                log.warning("cannot read prefix-cache streams from Redis (%s); keeping the index as it is", e)
            self._failing = True
            if block:
                await asyncio.sleep(self.block_ms / 1000)
            return 0
        self._failing = False
        self._track()                                  # instances may have left while we waited
        applied = 0
        prefix = f"tandem:{self.cluster}:prefix:"
        for key, entries in answer or ():
            instance_id = (key.decode() if isinstance(key, bytes) else key).removeprefix(prefix)
            for entry_id, fields in entries:
                if instance_id not in self._last_id:
                    break
                if not self._apply(instance_id, fields):
                    self._resync(instance_id)
                    break
                self._last_id[instance_id] = entry_id
                applied += 1
        self.entries_applied += applied
        return applied

    def _apply(self, instance_id: str, fields: dict) -> bool:
        """Apply one entry; False when it does not follow what was applied (a diff of an epoch
        whose full entry this index did not take): the stream is read again from its start."""
        epoch, kind = fields.get(b"epoch"), fields.get(b"kind")
        try:
            added, removed = unpack_hashes(fields.get(b"add")), unpack_hashes(fields.get(b"del"))
            block_size = int(fields.get(b"bs") or 0)
        except ValueError as e:
            log.warning("ignoring a malformed prefix entry of %s: %s", instance_id, e)
            return True
        if kind == FULL:
            self.index.replace(instance_id, added)
            self._epoch[instance_id] = epoch
            self.block_size[instance_id] = block_size
            return True
        if self._epoch.get(instance_id) != epoch:
            return False
        self.index.apply(instance_id, added, removed)
        return True

    async def _check_epochs(self) -> None:
        """Every check_interval_s, compare each followed stream's first entry (always its latest
        full one's epoch) with the epoch applied: a worker restarted under the same id, with stream
        ids that do not follow the old ones, would otherwise go unseen."""
        now = asyncio.get_running_loop().time()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval_s
        for instance_id, last in list(self._last_id.items()):
            if last == b"0":
                continue
            first = await self._redis.xrange(prefix_key(self.cluster, instance_id), count=1)
            if not first:                              # stream gone (expired): nothing is known there
                self.index.drop(instance_id)
                self._resync(instance_id)
            elif first[0][1].get(b"epoch") != self._epoch.get(instance_id):
                self._resync(instance_id)

    async def _loop(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:                          # never let a bug end the follower
                log.exception("prefix index follower failed; retrying")
                await asyncio.sleep(self.block_ms / 1000)


def cached_tokens(index: PrefixIndex, prompt_token_ids: Sequence[int], block_size: int,
                  memo: dict | None = None) -> dict[str, int]:
    """instance → prompt tokens its prefix cache would serve for this prompt: the leading full
    blocks it holds, leaving at least one token to compute (as the engine's own match does).
    `memo` (a dict kept with the request) saves hashing the prompt again on a retry."""
    key = ("prefix_hashes", block_size)
    hashes = memo.get(key) if memo is not None else None
    if hashes is None:
        hashes = prefix_block_hashes(prompt_token_ids, block_size,
                                     max_blocks=max(0, len(prompt_token_ids) - 1) // block_size)
        if memo is not None:
            memo[key] = hashes
    return {i: n * block_size for i, n in index.overlap(hashes).items()}
