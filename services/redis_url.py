"""Redis URLs, parsed in one place: a plain server or a Sentinel-managed master.

    redis://[[user]:password@]host:port[/db]            one server (rediss:// for TLS; redis-py parses it)
    redis+sentinel://[[user]:password@]h1:p1[,h2:p2...]/service[/db][?sentinel_password=S]

With Sentinel the client asks the sentinels (any that answers) for the master of `service` on
every new connection, so after a failover the next command (every Tandem caller retries on its
next tick) reaches the new master. user/password authenticate to the master; sentinel_password
(if the sentinels need one) to the sentinels.

Sentinel or a managed Redis (ElastiCache, Memorystore, Azure Cache) with automatic failover gives
a registry, leader lock and load reports that survive a Redis node's loss within the failover time
(seconds); what a failover loses (writes not yet replicated) Tandem rebuilds on its own: workers
republish their records every heartbeat and the leader lock is taken again within its TTL. Without
either, Redis is a single point of failure for *changes* only: routers keep placing on the last
registry they read, streams in flight never touch Redis, and everything re-registers when it is back.
"""
from __future__ import annotations

import dataclasses
import urllib.parse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379


class RedisUrlError(ValueError):
    """A Redis URL that cannot be used; the message says how to write it."""


@dataclasses.dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The parts of a redis+sentinel:// URL; None for any other scheme. Raises RedisUrlError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    usage = f"write it as {SENTINEL_SCHEME}://[:password@]host:port[,host:port...]/service_name[/db]"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for item in filter(None, hosts.split(",")):
        if item.startswith("["):                       # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        try:
            sentinels.append((host, int(port) if port else DEFAULT_SENTINEL_PORT))
        except ValueError:
            raise RedisUrlError(f"{url!r}: sentinel port {port!r} is not a number; {usage}") from None
    if not sentinels:
        raise RedisUrlError(f"{url!r}: no sentinel address; {usage}")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise RedisUrlError(f"{url!r}: name the master's service (as in the sentinels' `sentinel monitor`); {usage}")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise RedisUrlError(f"{url!r}: database {path[1]!r} is not a number; {usage}") from None
    username, _, password = userinfo.partition(":")
    query = urllib.parse.parse_qs(parts.query)
    return SentinelUrl(tuple(sentinels), urllib.parse.unquote(path[0]), db,
                       urllib.parse.unquote(username) or None, urllib.parse.unquote(password) or None,
                       (query.get("sentinel_password") or [None])[0])


class _SentinelManaged(aioredis.Redis):
    """A master client that also closes its connections to the sentinels."""
    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.sentinel.sentinels if self.sentinel is not None else ():
            await client.aclose()


def connect(redis_url: str, timeout_s: float) -> aioredis.Redis:
    """An asyncio client that fails fast: every socket operation is bounded by timeout_s and a
    failed command is retried once at once (a pooled connection may predate a Redis restart or a
    failover). Callers that poll or heartbeat do their own retrying on the next tick. Raises
    RedisUrlError (or redis-py's ValueError) for a malformed URL."""
    common = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))
    target = parse_sentinel_url(redis_url)
    if target is None:
        return aioredis.Redis.from_url(redis_url, **common)
    sentinel_kwargs = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    client = sentinel.master_for(target.service, redis_class=_SentinelManaged, db=target.db,
                                 username=target.username, password=target.password, **common)
    client.sentinel = sentinel
    return client


PLAIN_SCHEMES = ("redis", "rediss", "unix")


def check_url(url: str) -> str:
    """url unchanged if Tandem can connect with it; RedisUrlError saying how to write it if not
    (for command-line flags: an error at start, not a traceback at the first command)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
    elif scheme not in PLAIN_SCHEMES:
        raise RedisUrlError(f"{url!r}: use redis://host:port/db, rediss:// (TLS), unix:///path or "
                            f"{SENTINEL_SCHEME}://host:port[,host:port...]/service_name[/db]")
    return url


def url_argument(url: str) -> str:
    """argparse `type=` for a --redis flag: check_url, its message shown as the flag's error."""
    import argparse
    try:
        return check_url(url)
    except RedisUrlError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
