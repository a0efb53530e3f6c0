"""What the leader's periodic deciders share (the rescheduler, the role switcher): acting only while
this router leads, a round every interval that a failing round does not end, and fresh loads read
straight from the workers."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import grpc

from services.worker_pool import WorkerPool
from tandem.v1 import worker_pb2


def leads(leader) -> bool:
    """True without a leader lock (a single router, tests) or while holding it."""
    return leader is None or leader.is_leader


async def rounds(interval_s: float, acting: Callable[[], bool], round_fn: Callable[[], Awaitable],
                 log: logging.Logger, what: str) -> None:
    """Forever: sleep interval_s, then round_fn() if acting(); a round that raises is logged."""
    while True:
        await asyncio.sleep(interval_s)
        if not acting():
            continue
        try:
            await round_fn()
        except Exception:
            log.exception("%s round failed", what)


async def fresh_reports(pool: WorkerPool, reports: Iterable[worker_pb2.LoadReport],
                        timeout_s: float) -> list[worker_pb2.LoadReport]:
    """Each instance's own Stats answer, asked concurrently; those that do not answer in time are
    left out."""
    async def fetch(r: worker_pb2.LoadReport):
        try:
            return await pool.stub(r.address).Stats(worker_pb2.StatsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None
    return [r for r in await asyncio.gather(*(fetch(r) for r in reports)) if r is not None]
