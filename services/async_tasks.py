"""Stopping background asyncio tasks reliably."""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task | None, timeout_s: float = 10.0) -> None:
    """Cancel `task` and wait until it has ended (at most `timeout_s`, then log and give up).

    One cancel is not always enough: a client library may turn a cancellation that lands inside
    its own timeout block into its timeout error (redis-py's asyncio client can), and a loop that
    retries on that error would then run forever. So the cancel is repeated until the task ends;
    the next `await asyncio.sleep` of such a loop takes it. Never raises.
    """
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
        if loop.time() > deadline and not task.done():
            log.warning("task %s did not stop within %.0fs", task.get_name(), timeout_s)
            return
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())
