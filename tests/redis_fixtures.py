"""Redis fixtures: one real redis-server per test session, emptied before each test that uses it.

Registered for tests/integration by its conftest.py; other test directories may import them too.
"""
from __future__ import annotations

import pytest
import redis

from tandem.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """A running RedisServer on a free port, stopped at the end of the session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session server's URL, with every key deleted first."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url
