"""Redis restart or loss (issue 18, item 3) on real processes: a real redis-server stopped and
started again (empty) under load on a 1P+1D cluster; a Sentinel URL against a real redis-server
in sentinel mode."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time

import pytest
import redis

from router.cluster.leader_lock import leader_key
from router.cluster.registry import InstanceRegistry
from services.redis_url import RedisUrlError, check_url, connect, parse_sentinel_url
from services.registry import InstancePublisher, instance_pattern
from tandem.local_cluster import LocalCluster
from tandem.redis_server import RedisServer, _free_port, _serving_pid, die_with_parent
from tandem.v1 import worker_pb2
from tests.conftest import random_prompts
from tests.integration.cluster_helpers import assert_no_leaks, generate

pytestmark = pytest.mark.timeout(600)


def _keys(url: str, pattern: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return list(client.scan_iter(match=pattern))


def _wait(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_serving_goes_on_through_a_redis_restart(export_named, tmp_path):
    """Requests stream while Redis is down for longer than the heartbeat TTL and then comes back
    empty: every request completes with the tokens of a quiet run, the workers re-register, a
    leader holds the lock again, nothing leaks."""
    server = RedisServer().start()
    port = server.port
    args = ["--num-blocks", "300", "--heartbeat-ttl-s", "1.5", "--heartbeat-interval-s", "0.5"]
    try:
        with LocalCluster(export_named("tiny"), prefill=1, decode=1, redis_url=server.url, worker_args=args,
                          router_args=["--poll-interval-s", "0.2"], pools="fixed", log_dir=str(tmp_path)) as c:
            prompts = random_prompts([12, 40, 90, 25], 512, seed=11)
            expected = [generate(c.address, p, 60, ignore_eos=True)[0] for p in prompts]
            _wait(lambda: _keys(server.url, leader_key("default")), "a router leads")
            results, errors, stop = [], [], threading.Event()

            def load(i):
                while not stop.is_set():
                    try:
                        tokens, _ = generate(c.address, prompts[i], 60, ignore_eos=True)
                        results.append((i, tokens))
                    except Exception as e:      # surfaced below
                        errors.append(e)
                        return
            threads = [threading.Thread(target=load, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            _wait(lambda: len(results) >= 4, "requests complete before the outage")
            server.stop()
            down_at = len(results)
            time.sleep(2.5)                                          # > the heartbeat TTL
            _wait(lambda: len(results) >= down_at + 4, "requests complete while Redis is down")
            server = RedisServer(port=port).start()                  # back, and empty
            _wait(lambda: len(_keys(server.url, instance_pattern("default"))) == 2, "the workers re-register")
            _wait(lambda: _keys(server.url, leader_key("default")), "a router takes the leader lock again")
            up_at = len(results)
            _wait(lambda: len(results) >= up_at + 4, "requests complete after Redis is back")
            stop.set()
            for t in threads:
                t.join(60)
            assert not errors, errors
            assert all(tokens == expected[i] for i, tokens in results)
            assert_no_leaks(c.address)
    finally:
        server.stop()


def test_registry_keeps_instances_that_a_restarted_redis_lost(redis_url):
    """Redis restarted between two polls (no failed poll to see): the new run_id tells, and the
    instances it lost stay placeable for the grace period instead of vanishing at once."""
    async def main():
        report = worker_pb2.LoadReport(instance_id="d0", role=worker_pb2.ROLE_DECODE, state="serving")
        pub = InstancePublisher(redis_url, "c", lambda: report, ttl_s=30, interval_s=10)
        reg = InstanceRegistry(redis_url, "c", poll_interval_s=10, recovery_grace_s=30)
        await pub.start()
        await reg.start()
        try:
            assert [r.instance_id for r in reg.instances()] == ["d0"]
            reg._server_run_id = "an-older-server"                 # as if the server had restarted
            with redis.Redis.from_url(redis_url) as client:
                client.flushall()                                   # ... and lost every record
            assert await reg.refresh()
            assert [r.instance_id for r in reg.instances()] == ["d0"]
            reg._keep_until = 0.0                                   # the grace is over
            assert await reg.refresh()
            assert reg.instances() == []
        finally:
            await reg.stop()
            await pub.stop()
    asyncio.run(main())


def test_redis_urls_are_checked_with_a_message_saying_how():
    assert check_url("redis://h:1/0") and check_url("rediss://h:1/0") and check_url("redis+sentinel://a:1/m")
    for bad, says in [("http://h:1", "redis://host:port/db"), ("redis+sentinel://a:1", "service"),
                      ("redis+sentinel://a:b/m", "not a number"), ("redis+sentinel:///m", "no sentinel")]:
        with pytest.raises(RedisUrlError, match=says):
            check_url(bad)
    target = parse_sentinel_url("redis+sentinel://:pw@a:1,b,[::1]:3/mymaster/2?sentinel_password=s")
    assert target.sentinels == (("a", 1), ("b", 26379), ("::1", 3))
    assert (target.service, target.db, target.password, target.sentinel_password) == ("mymaster", 2, "pw", "s")


@pytest.fixture
def sentinel(tmp_path):
    """A real redis-server master and one redis-server in sentinel mode monitoring it as `tandem`;
    yields the redis+sentinel:// URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as master:
        port = _free_port("127.0.0.1")
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor tandem 127.0.0.1 {master.port} 1\n")
        parent = os.getpid()
        proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=lambda: die_with_parent(parent))
        try:
            _wait(lambda: _serving_pid("127.0.0.1", port) == proc.pid, "the sentinel answers", 10)
            yield f"redis+sentinel://127.0.0.1:{port}/tandem/0", master
        finally:
            proc.terminate()
            proc.wait(10)


def test_sentinel_url_reaches_the_master(sentinel):
    url, master = sentinel

    async def main():
        report = worker_pb2.LoadReport(instance_id="d0", role=worker_pb2.ROLE_DECODE, state="serving")
        pub = InstancePublisher(url, "s", lambda: report, ttl_s=30, interval_s=10)
        reg = InstanceRegistry(url, "s", poll_interval_s=10)
        await pub.start()
        await reg.start()
        try:
            assert pub.registered and [r.instance_id for r in reg.instances()] == ["d0"]
        finally:
            await reg.stop()
            await pub.stop()
        client = connect(url, timeout_s=2.0)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    asyncio.run(main())
    assert _keys(master.url, instance_pattern("s")) == []        # the publisher deleted its record on stop
