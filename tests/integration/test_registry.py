"""Instance registry against a real redis-server: publish, watch, expire, outages."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from router.cluster.registry import InstanceRegistry
from services.registry import InstancePublisher, instance_key, now_unix_ms
from tandem.redis_server import RedisServer, RedisServerError
from tandem.v1 import worker_pb2

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "test"
BOUND_S = 20.0          # generous bound for anything that waits on a TTL or a heartbeat


def report(instance_id="d0", role=worker_pb2.ROLE_DECODE, state="serving", **fields):
    return worker_pb2.LoadReport(instance_id=instance_id, role=role, state=state,
                                 address=f"127.0.0.1:1{instance_id[-1]}", total_blocks=64,
                                 free_blocks=fields.pop("free_blocks", 64), **fields)


async def wait_until(predicate, what: str) -> None:
    """Poll an async or plain predicate until true; fail after BOUND_S."""
    deadline = time.monotonic() + BOUND_S
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


def ping(url: str) -> bool:
    with redis.Redis.from_url(url) as client:
        return client.ping()


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:                                     # a zombie no one has reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_registry_sees_published_load_and_state_changes(redis_url):
    async def main():
        current = report("d0", free_blocks=40, running=2)
        changes = []
        pub = InstancePublisher(redis_url, CLUSTER, lambda: current, ttl_s=30, interval_s=10)
        reg = InstanceRegistry(redis_url, CLUSTER, poll_interval_s=10,
                               on_change=lambda view: changes.append(dict(view)))
        await pub.start()
        await reg.start()
        try:
            [seen] = reg.instances(role=worker_pb2.ROLE_DECODE)
            assert (seen.instance_id, seen.free_blocks, seen.running) == ("d0", 40, 2)
            assert seen.updated_unix_ms and not current.updated_unix_ms   # the stamp lands on a copy
            assert reg.instances(role=worker_pb2.ROLE_PREFILL) == []
            with redis.Redis.from_url(redis_url) as client:
                raw = json.loads(client.get(instance_key(CLUSTER, "d0")))
            assert raw["role"] == "ROLE_DECODE" and raw["free_blocks"] == 40
            assert raw["waiting"] == 0                                 # zeros are shown too
            assert len(changes) == 1 and set(changes[0]) == {"d0"}

            current.free_blocks = 5                                    # load only: no on_change
            assert await pub.publish_now()
            assert await reg.refresh()
            assert reg.get("d0").free_blocks == 5 and len(changes) == 1

            current.state = "draining"
            await pub.publish_now()
            await reg.refresh()
            assert reg.instances() == []
            assert [r.state for r in reg.all()] == ["draining"]
            assert [r.instance_id for r in reg.instances(states=None)] == ["d0"]
            assert len(changes) == 2 and changes[1]["d0"].state == "draining"
        finally:
            await reg.stop()
            await pub.stop()
    asyncio.run(main())


def test_stop_deletes_the_record(redis_url):
    async def main():
        pub = InstancePublisher(redis_url, CLUSTER, lambda: report("d1"), ttl_s=30, interval_s=10)
        reg = InstanceRegistry(redis_url, CLUSTER)
        await pub.start()
        await reg.start()
        assert reg.get("d1") is not None
        with pytest.raises(RuntimeError, match="twice"):
            await pub.start()
        await pub.stop()
        await pub.stop()                                               # second stop: no-op
        assert await pub.publish_now() is False
        await reg.refresh()
        assert reg.get("d1") is None and reg.all() == []
        await reg.stop()
    asyncio.run(main())


PUBLISHER_SCRIPT = """
import asyncio, sys
from services.registry import InstancePublisher
from tandem.v1 import worker_pb2

async def main():
    r = worker_pb2.LoadReport(instance_id="dying", role=worker_pb2.ROLE_DECODE, state="serving")
    pub = InstancePublisher(sys.argv[1], sys.argv[2], lambda: r, ttl_s=1.0, interval_s=0.3)
    await pub.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_killed_publisher_disappears_after_its_ttl(redis_url):
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER_SCRIPT, redis_url, CLUSTER],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"

        async def main():
            reg = InstanceRegistry(redis_url, CLUSTER, poll_interval_s=0.1)
            await reg.start()
            try:
                assert [r.instance_id for r in reg.instances()] == ["dying"]
                await asyncio.sleep(1.5)      # longer than the TTL: the heartbeat keeps it alive
                assert [r.instance_id for r in reg.instances()] == ["dying"]
                proc.send_signal(signal.SIGKILL)
                await wait_until(lambda: reg.instances() == [], "the dead record expired")
            finally:
                await reg.stop()
        asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_mark_unreachable_holds_until_a_newer_record(redis_url):
    async def main():
        pub = InstancePublisher(redis_url, CLUSTER, lambda: report("d2"), ttl_s=30, interval_s=10)
        reg = InstanceRegistry(redis_url, CLUSTER, poll_interval_s=10)
        await pub.start()
        await reg.start()
        try:
            marked = reg.get("d2")
            reg.mark_unreachable("d2")
            assert reg.instances() == [] and reg.is_unreachable("d2")
            assert reg.get("d2") == marked and reg.all() == [marked]
            await reg.refresh()                                        # same record: still out
            assert reg.instances() == []

            while now_unix_ms() <= marked.updated_unix_ms:             # a strictly newer stamp
                await asyncio.sleep(0.001)
            await pub.publish_now()
            await reg.refresh()
            assert [r.instance_id for r in reg.instances()] == ["d2"]
            assert not reg.is_unreachable("d2")

            reg.mark_unreachable("d2")                                 # the record vanishing
            await pub.stop()                                           # also ends the mark
            await reg.refresh()
            assert not reg.is_unreachable("d2")
            reg.mark_unreachable("nobody")                             # no record: no-op
            assert not reg.is_unreachable("nobody")
        finally:
            await reg.stop()
            await pub.stop()
    asyncio.run(main())


def test_malformed_record_is_skipped(redis_url):
    async def main():
        client = redis.Redis.from_url(redis_url)
        client.set(instance_key(CLUSTER, "junk"), b"{not json")
        client.set(instance_key("other-cluster", "x0"), b"{}")
        pub = InstancePublisher(redis_url, CLUSTER, lambda: report("d3"), ttl_s=30, interval_s=10)
        reg = InstanceRegistry(redis_url, CLUSTER)
        await pub.start()
        await reg.start()
        assert [r.instance_id for r in reg.all()] == ["d3"]
        await reg.stop()
        await pub.stop()
    asyncio.run(main())


def test_publisher_rejects_bad_configuration(redis_url):
    with pytest.raises(ValueError, match="interval_s"):
        InstancePublisher(redis_url, CLUSTER, report, ttl_s=1.0, interval_s=1.0)

    async def main():
        pub = InstancePublisher(redis_url, CLUSTER,
                                lambda: worker_pb2.LoadReport(role=worker_pb2.ROLE_DECODE))
        with pytest.raises(ValueError, match="instance_id"):
            await pub.start()
    asyncio.run(main())


def test_publisher_and_registry_survive_redis_going_away():
    server = RedisServer().start()
    port = server.port
    try:
        async def main():
            nonlocal server
            pub = InstancePublisher(server.url, CLUSTER, lambda: report("d5"),
                                    ttl_s=1.0, interval_s=0.2)
            reg = InstanceRegistry(server.url, CLUSTER, poll_interval_s=0.1)
            await pub.start()
            await reg.start()
            assert pub.registered and reg.get("d5") is not None

            server.stop()
            await wait_until(lambda: not pub.registered, "the heartbeat noticed the outage")
            assert await pub.publish_now() is False
            assert await reg.refresh() is False
            assert [r.instance_id for r in reg.instances()] == ["d5"]  # last good view kept

            server = RedisServer(port=port).start()                    # Redis comes back empty
            await wait_until(lambda: pub.registered, "the heartbeat re-published")
            await wait_until(reg.refresh, "the registry polled again")
            assert [r.instance_id for r in reg.instances()] == ["d5"]

            server.stop()
            await pub.stop()                                           # Redis gone: no raise
            await reg.stop()
        asyncio.run(main())
    finally:
        server.stop()


def test_redis_server_stop_leaves_no_process():
    server = RedisServer()
    server.stop()                                                      # before start: no-op
    with pytest.raises(RedisServerError, match="before start"):
        server.url
    server.start()
    pid = server.pid
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert ping(server.url)
    server.stop()
    assert process_gone(pid) and server.pid is None
    server.stop()                                                      # twice: no-op


def test_redis_server_start_errors_are_clear(tmp_path):
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        RedisServer(binary=str(tmp_path / "no-such-redis-server")).start()
    with RedisServer() as taken:
        with pytest.raises(RedisServerError, match="Address already in use"):
            RedisServer(port=taken.port).start()
        assert ping(taken.url)                                         # the first still serves


PARENT_SCRIPT = """
from tandem.redis_server import RedisServer
server = RedisServer().start()
print(server.pid, flush=True)
input()
"""


def test_redis_server_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert not process_gone(pid)
        parent.kill()                                                  # no chance to clean up
        parent.wait()
        asyncio.run(wait_until(lambda: process_gone(pid), "redis-server followed its parent"))
    finally:
        parent.kill()
        parent.wait()
        parent.stdin.close()
        parent.stdout.close()
