"""One leader among the router replicas of a cluster: a Redis lock with a TTL, renewed while held.

    lock = LeaderLock(redis_url, cluster)
    await lock.start()           # tries at once, then keeps trying / renewing in the background
    if lock.is_leader: ...       # the rescheduler and the autoscaler act only while this is True
    await lock.stop()            # releases the lock if held: another replica takes over at once

Key `tandem:{cluster}:leader`, value `<identity>/<random hex>` (the token; `redis-cli GET` shows who
leads). Acquire is `SET key token NX PX ttl`; renewal is a Lua compare-and-pexpire and release a Lua
compare-and-delete, so a replica never extends or deletes a lock it no longer owns.

Safety: is_leader is True only while the lock is held AND less than ttl_s has passed since the send
of the last acquire or renewal that Redis confirmed. Redis starts its TTL after that moment, so this
replica stops thinking it leads no later than Redis lets the key expire, even if renewals hang.
A renewal that fails (the key is gone or holds another token, or Redis does not answer) ends
leadership at once; the loop then tries to acquire again every ttl_s / 3. With Redis unreachable
nobody leads. One process should hold one LeaderLock: the rescheduler and the autoscaler share it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from services.async_tasks import stop_task
from services.registry import REDIS_DOWN, connect

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 10.0

# KEYS[1] lock key; ARGV[1] token; ARGV[2] ttl in ms. 1 if this token held it and it was extended.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lock key; ARGV[1] token. 1 if this token held it and it was deleted.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def leader_key(cluster: str) -> str:
    return f"tandem:{cluster}:leader"


def default_identity() -> str:
    """hostname:pid (a pod's hostname is its name)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaderLock:
    """The cluster's leader lock as seen by one contender.

    ttl_s: how long the lock outlives its holder's last renewal; renewals and acquire attempts
    run every ttl_s / 3. clock: monotonic seconds (injectable for tests). Listeners added with
    add_listener(fn) are called with True when this contender becomes leader and False when it
    stops being leader (from the asyncio loop; an exception in one is logged and ignored).
    """

    def __init__(self, redis_url: str, cluster: str, *, ttl_s: float = DEFAULT_TTL_S,
                 identity: str | None = None, clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0:
            raise ValueError(f"LeaderLock ttl_s must be > 0, got {ttl_s}")
        self._url, self.cluster, self.ttl_s, self._clock = redis_url, cluster, ttl_s, clock
        self.key = leader_key(cluster)
        self.token = f"{identity or default_identity()}/{secrets.token_hex(8)}"
        self._redis = None
        self._renew = self._release = None
        self._task: asyncio.Task | None = None
        self._held = False
        self._valid_until = 0.0              # clock() after which a held lock no longer counts
        self._listeners: list[Callable[[bool], None]] = []
        self._changed = asyncio.Event()      # set (and replaced) on every leadership change
        self._failing = False                # last Redis call failed (logged once per outage)

    @property
    def interval_s(self) -> float:
        return self.ttl_s / 3

    @property
    def is_leader(self) -> bool:
        """True while this contender holds the lock and its last confirmed renewal is < ttl_s old."""
        return self._held and self._clock() < self._valid_until

    def add_listener(self, fn: Callable[[bool], None]) -> None:
        self._listeners.append(fn)

    async def wait_changed(self) -> bool:
        """Wait for the next leadership change; returns the new is_leader."""
        await self._changed.wait()
        return self.is_leader

    async def start(self) -> None:
        """Try to acquire once now, then keep acquiring or renewing every interval_s in the
        background. Never raises on a Redis error (logs and retries). RuntimeError if started
        twice."""
        if self._redis is not None:
            raise RuntimeError("LeaderLock.start() called twice")
        self._redis = connect(self._url, timeout_s=min(self.interval_s, 2.0))
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        await self.step()
        self._task = asyncio.create_task(self._loop(), name=f"leader-lock-{self.cluster}")

    async def stop(self, release: bool = True) -> None:
        """Stop renewing and, if release, delete the lock when this contender holds it (so another
        takes over at once; with release=False it lapses after ttl_s, as if this process died).
        Never raises; safe to call twice or before start()."""
        await stop_task(self._task)
        self._task = None
        if self._redis is None:
            return
        if release:       # also when not held: a step cancelled by stop_task may have SET the key
            await self.release()      # after Redis took it (compare-and-delete: only our own token)
        self._set_held(False)
        with contextlib.suppress(*REDIS_DOWN):
            await self._redis.aclose()
        self._redis = None

    async def step(self) -> bool:
        """One acquire-or-renew round now; returns is_leader afterwards. Requires start()."""
        if self._redis is None:
            raise RuntimeError("LeaderLock: call start() first (or it was stopped)")
        sent = self._clock()
        try:
            if self._held:
                ok = await self._renew(keys=[self.key], args=[self.token, self._ttl_ms]) == 1
                if not ok:
                    log.warning("leader lock %s: lost (the key expired or another router holds "
                                "it)", self.key)
            else:
                ok = bool(await self._redis.set(self.key, self.token, nx=True, px=self._ttl_ms))
                if not ok:                   # ours from before a failed renewal: take it back
                    ok = await self._renew(keys=[self.key], args=[self.token, self._ttl_ms]) == 1
        except REDIS_DOWN as e:
            if not self._failing:
                log.warning("leader lock %s: Redis unreachable (%s); %s", self.key, e,
                            "stepping down" if self._held else "not leading until it answers")
            self._failing = True
            self._set_held(False)
            return False
        if self._failing:
            log.info("leader lock %s: Redis reachable again", self.key)
        self._failing = False
        if ok:
            self._valid_until = sent + self.ttl_s
        self._set_held(ok)
        return self.is_leader

    async def release(self) -> bool:
        """Delete the lock if this contender's token holds it; True if it did. Leadership ends
        either way. Never raises on a Redis error (the lock then lapses after ttl_s)."""
        self._set_held(False)
        if self._redis is None:
            return False
        try:
            return await self._release(keys=[self.key], args=[self.token]) == 1
        except REDIS_DOWN as e:
            log.warning("leader lock %s: could not release (%s); it lapses in %.1fs", self.key, e,
                        self.ttl_s)
            return False

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def _set_held(self, held: bool) -> None:
        if held == self._held:
            return
        self._held = held
        log.info("leader lock %s: %s (%s)", self.key, "now leader" if held else "no longer leader",
                 self.token)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for fn in list(self._listeners):
            try:
                fn(held)
            except Exception:
                log.exception("leader lock listener failed")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.step()
