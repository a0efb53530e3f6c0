"""The Redis leader lock against a real redis-server: one leader among contenders, takeover after
the TTL or at once on release, nobody leads while Redis is down, fencing by token."""
from __future__ import annotations

import asyncio
import time

import pytest
import redis

from router.cluster.leader_lock import LeaderLock, leader_key
from tandem.redis_server import RedisServer
from tests.aio import run

CLUSTER = "test"
TTL_S = 0.6
BOUND_S = 20.0           # generous bound for anything that waits on a TTL


async def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


def leaders(locks) -> list[LeaderLock]:
    return [lock for lock in locks if lock.is_leader]


async def started(url: str, n: int, ttl_s: float = TTL_S) -> list[LeaderLock]:
    locks = [LeaderLock(url, CLUSTER, ttl_s=ttl_s, identity=f"router-{i}") for i in range(n)]
    for lock in locks:
        await lock.start()
    return locks


async def stopped(locks) -> None:
    for lock in locks:
        await lock.stop()


def holder(url: str) -> bytes | None:
    with redis.Redis.from_url(url) as client:
        return client.get(leader_key(CLUSTER))


@run
async def test_exactly_one_of_several_contenders_leads(redis_url):
    locks = await started(redis_url, 3)
    try:
        assert len(leaders(locks)) == 1
        first = leaders(locks)[0]
        assert holder(redis_url) == first.token.encode()
        # Several renewal rounds later the same one still leads and nobody else does.
        for _ in range(3):
            await asyncio.sleep(first.interval_s)
            assert leaders(locks) == [first]
    finally:
        await stopped(locks)
    assert holder(redis_url) is None                 # the leader released on stop


@run
async def test_leader_that_stops_renewing_is_replaced_after_the_ttl(redis_url):
    a, b = await started(redis_url, 2)
    try:
        assert a.is_leader and not b.is_leader
        await a.stop(release=False)                  # as if the process died: the key lapses
        assert not a.is_leader
        assert holder(redis_url) == a.token.encode() and not b.is_leader
        with redis.Redis.from_url(redis_url) as client:
            assert 0 < client.pttl(leader_key(CLUSTER)) <= TTL_S * 1000
        await wait_until(lambda: b.is_leader, "b takes over")
        assert holder(redis_url) == b.token.encode()
    finally:
        await stopped([a, b])


@run
async def test_release_hands_over_at_once(redis_url):
    a, b = await started(redis_url, 2, ttl_s=30.0)   # a TTL far longer than the wait below
    try:
        assert a.is_leader
        changes = []
        b.add_listener(changes.append)
        await a.stop()                               # compare-and-delete
        assert holder(redis_url) is None
        assert await b.step() is True                # b's next round takes it, no TTL to wait
        assert changes == [True] and leaders([a, b]) == [b]
    finally:
        await stopped([a, b])


@run
async def test_renewal_never_extends_or_deletes_another_token(redis_url):
    (a,) = await started(redis_url, 1)
    try:
        assert a.is_leader
        with redis.Redis.from_url(redis_url) as client:
            client.set(leader_key(CLUSTER), b"intruder", px=60_000)
        assert await a.step() is False               # renewal sees another token: steps down
        assert await a.release() is False            # and does not delete theirs
        assert holder(redis_url) == b"intruder"
    finally:
        await a.stop()


@run
async def test_is_leader_ends_with_the_ttl_even_without_a_renewal_answer(redis_url):
    now = [100.0]
    lock = LeaderLock(redis_url, CLUSTER, ttl_s=5.0, clock=lambda: now[0])
    await lock.start()
    try:
        assert lock.is_leader
        now[0] += 4.9
        assert lock.is_leader
        now[0] += 0.2                                # past the TTL of the last confirmed round
        assert not lock.is_leader
        assert await lock.step() is True             # a confirmed renewal counts from its send
        assert lock.is_leader
    finally:
        await lock.stop()


@run
async def test_redis_down_nobody_leads_and_one_leads_again_after_restart():
    server = RedisServer().start()
    port = server.port
    locks = await started(server.url, 2)
    try:
        assert len(leaders(locks)) == 1
        server.stop()
        await wait_until(lambda: not leaders(locks), "nobody leads while Redis is down")
        for lock in locks:                           # every round fails: still nobody
            assert await lock.step() is False
        server = RedisServer(port=port).start()      # empty: the old key is gone
        await wait_until(lambda: len(leaders(locks)) == 1, "one leads again")
        await asyncio.sleep(TTL_S)
        assert len(leaders(locks)) == 1
    finally:
        await stopped(locks)
        server.stop()


@run
async def test_unreachable_redis_at_start_is_not_an_error():
    server = RedisServer().start()
    url = server.url
    server.stop()                                    # nothing listens there now
    lock = LeaderLock(url, CLUSTER, ttl_s=TTL_S)
    await lock.start()
    try:
        assert not lock.is_leader
        assert await lock.step() is False
    finally:
        await lock.stop()


@run
async def test_listeners_see_gain_and_loss(redis_url):
    (a,) = await started(redis_url, 1)
    seen = []
    a.add_listener(seen.append)
    try:
        with redis.Redis.from_url(redis_url) as client:
            client.delete(leader_key(CLUSTER))
            client.set(leader_key(CLUSTER), b"other", px=int(TTL_S * 1000))
        assert await a.wait_changed() is False       # the background renewal notices
        await wait_until(lambda: a.is_leader, "a takes the lapsed lock back")
        assert seen == [False, True]
    finally:
        await a.stop()


def test_bad_ttl_is_refused():
    with pytest.raises(ValueError, match="ttl_s"):
        LeaderLock("redis://127.0.0.1:1/0", CLUSTER, ttl_s=0)
