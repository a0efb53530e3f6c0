"""A worker's prefix cache and the router's index of it stay in agreement through a real Redis:
add and evict events, compaction, a worker restart under the same id (no stale entry survives),
a Redis that lost the stream, and an instance that leaves. Publisher and follower run in this
process over a real KVCacheManager; the worker in tests/integration/test_prefix_routing.py is a
real process."""
from __future__ import annotations

import asyncio
import random

import pytest
import redis

from router.cluster.prefix_index import PrefixIndex, PrefixIndexFollower
from services.engine.kv_cache import KVCacheManager
from services.prefix_stream import PrefixPublisher, prefix_key

pytestmark = pytest.mark.timeout(120)
BS = 4
CLUSTER = "pfx"


class FakeWorker:
    """A KV manager with a publisher, driven by random prefill/free traffic."""

    def __init__(self, redis_url: str, instance_id: str, num_blocks: int = 16, seed: int = 0, compact_every: int = 256):
        self.instance_id = instance_id
        self.kv = KVCacheManager(num_blocks, BS)
        self.kv.record_prefix_events()

        async def snapshot():
            return self.kv.prefix_snapshot()
        self.publisher = PrefixPublisher(redis_url, CLUSTER, instance_id, BS, self.kv.prefix_events, snapshot,
                                         compact_every=compact_every)
        self.rng = random.Random(seed)
        self.prefixes = [[self.rng.randrange(40) for _ in range(8)] for _ in range(3)]
        self.live: list[str] = []
        self.n = 0

    def traffic(self, steps: int) -> None:
        for _ in range(steps):
            if self.live and (self.rng.random() < 0.45 or len(self.live) > 3):
                self.kv.free(self.live.pop(self.rng.randrange(len(self.live))))
                continue
            self.n += 1
            rid = f"r{self.n}"
            toks = self.rng.choice(self.prefixes) + [self.rng.randrange(40) for _ in range(self.rng.randrange(1, 12))]
            if self.kv.allocate(rid, toks, len(toks)) is None:
                continue
            self.kv.cache_blocks(rid, toks, len(toks))
            self.live.append(rid)

    def cached(self) -> set[int]:
        return set(self.kv.prefix_snapshot()[1])


async def settle(worker: FakeWorker, follower: PrefixIndexFollower) -> None:
    assert await worker.publisher.flush()
    await follower.poll(block=False)


def run(coro):
    return asyncio.run(coro)


def test_add_evict_compaction_and_restart_keep_router_and_worker_in_agreement(redis_url):
    async def main():
        ids = {"w0", "w1"}
        index = PrefixIndex()
        follower = PrefixIndexFollower(redis_url, CLUSTER, index, lambda: sorted(ids), block_ms=50)
        workers = {i: FakeWorker(redis_url, i, seed=n, compact_every=5) for n, i in enumerate(sorted(ids))}
        for w in workers.values():
            await w.publisher.start()
        await follower.start()
        try:
            for _ in range(40):                       # many diffs; a compaction every 5
                for w in workers.values():
                    w.traffic(3)
                    await settle(w, follower)
                for i, w in workers.items():
                    assert index.hashes(i) == w.cached()
            index.check_integrity()
            r = redis.Redis.from_url(redis_url)
            entries = r.xrange(prefix_key(CLUSTER, "w0"))
            assert entries[0][1][b"kind"] == b"full" and len(entries) <= 6    # trimmed at each full entry
            # A restart under the same id: the new process's cache is empty and its stream starts
            # over; nothing the old one cached survives in the index.
            old = workers["w0"]
            await old.publisher.stop()
            assert old.cached() != set()
            new = workers["w0"] = FakeWorker(redis_url, "w0", seed=9)
            await new.publisher.start()
            await follower.poll(block=False)
            assert index.hashes("w0") == set()
            new.traffic(10)
            await settle(new, follower)
            assert index.hashes("w0") == new.cached() != set()
            # Redis lost the stream (flushed, expired): the follower drops what it knew, the
            # publisher starts the stream again with a full entry, and they agree again.
            r.delete(prefix_key(CLUSTER, "w1"))
            follower._next_check = 0.0
            await follower.poll(block=False)
            assert index.hashes("w1") == set()
            workers["w1"].traffic(4)
            await settle(workers["w1"], follower)
            assert index.hashes("w1") == workers["w1"].cached()
            # An instance that leaves the registry leaves the index.
            ids.discard("w1")
            await follower.poll(block=False)
            assert index.instances() == ["w0"]
            index.check_integrity()
            r.close()
        finally:
            await follower.stop()
            for w in workers.values():
                await w.publisher.stop()
    run(main())


def test_a_follower_that_starts_late_or_falls_behind_catches_up(redis_url):
    async def main():
        w = FakeWorker(redis_url, "w0", seed=4, compact_every=3)
        await w.publisher.start()
        for _ in range(20):                           # history with several compactions before anyone reads
            w.traffic(4)
            assert await w.publisher.flush()
        index = PrefixIndex()
        follower = PrefixIndexFollower(redis_url, CLUSTER, index, lambda: ["w0"], block_ms=50)
        await follower.start()
        try:
            assert index.hashes("w0") == w.cached()
            for _ in range(12):                       # the follower does not read while these pass
                w.traffic(4)
                assert await w.publisher.flush()
            await follower.poll(block=False)
            assert index.hashes("w0") == w.cached()
            # Background loops: the follower sees a change without being asked.
            w.traffic(6)
            for _ in range(100):
                if index.hashes("w0") == w.cached():
                    break
                await asyncio.sleep(0.02)
            assert index.hashes("w0") == w.cached()
        finally:
            await follower.stop()
            await w.publisher.stop()
        assert not redis.Redis.from_url(redis_url).exists(prefix_key(CLUSTER, "w0"))   # stop deletes it
    run(main())


def test_events_lost_to_overflow_resend_the_full_state(redis_url, monkeypatch):
    async def main():
        w = FakeWorker(redis_url, "w0", seed=5)
        await w.publisher.start()
        index = PrefixIndex()
        follower = PrefixIndexFollower(redis_url, CLUSTER, index, lambda: ["w0"], block_ms=50)
        await follower.start()
        try:
            w.traffic(30)
            for _ in range(3):                        # as if the bounded deque had dropped the oldest
                w.kv.prefix_events.popleft()
            await settle(w, follower)
            assert index.hashes("w0") == w.cached()
        finally:
            await follower.stop()
            await w.publisher.stop()
    run(main())
