"""services/grpc_backlog.py: a burst past gRPC C-core's pending-call limit reaches the application
(no silent `CANCELLED: CANCELLED`), on a plain grpc.aio server with the options the router and the
workers use, and one with a small C-core limit shows the drop the options turn off."""
from __future__ import annotations

import asyncio
import collections

import grpc

from services.grpc_backlog import SERVER_BACKLOG_OPTIONS
from tandem.v1 import serving_pb2, serving_pb2_grpc


class _Slow(serving_pb2_grpc.ServingServicer):
    async def Generate(self, request, context):
        for i in range(3):
            await asyncio.sleep(0.05)
            yield serving_pb2.GenerateResponse(index=i, token_ids=[1])


async def _burst(options, n: int) -> collections.Counter:
    server = grpc.aio.server(options=options)
    serving_pb2_grpc.add_ServingServicer_to_server(_Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serving_pb2_grpc.ServingStub(channel)

            async def one():
                try:
                    async for _ in stub.Generate(serving_pb2.GenerateRequest(), timeout=120):
                        pass
                    return "ok"
                except grpc.RpcError as e:
                    return f"{e.code().name}: {e.details()}"
            return collections.Counter(await asyncio.gather(*(one() for _ in range(n))))
    finally:
        await server.stop(None)


def test_a_burst_past_the_core_pending_limit_is_served():
    limited = [("grpc.server.max_pending_requests", 10), ("grpc.server.max_pending_requests_hard_limit", 20)]
    dropped = asyncio.run(_burst(limited, 300))
    assert dropped["CANCELLED: CANCELLED"] > 0, dropped      # the silent drop (the 99 CANCELLED)
    assert asyncio.run(_burst(SERVER_BACKLOG_OPTIONS, 300)) == {"ok": 300}
