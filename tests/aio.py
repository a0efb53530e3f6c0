"""Async test bodies without pytest-asyncio: `@run` runs one on a fresh event loop."""
from __future__ import annotations

import asyncio
import functools


def run(test):
    """Decorate an `async def test_…`: pytest calls a plain function that runs it to completion."""
    @functools.wraps(test)
    def sync(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return sync
