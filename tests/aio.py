"""Async test bodies without pytest-asyncio (`@run` runs one on a fresh event loop), and scripted
workers served for real (`serve_worker`)."""
from __future__ import annotations

import asyncio
import functools

import grpc

from tandem.v1 import worker_pb2_grpc


def run(test):
    """Decorate an `async def test_…`: pytest calls a plain function that runs it to completion."""
    @functools.wraps(test)
    def sync(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return sync


async def serve_worker(servicer) -> tuple[grpc.aio.Server, str]:
    """(started server, its address): `servicer` as a tandem.v1.Worker on a free local port."""
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    return server, address
