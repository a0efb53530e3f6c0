"""AdminDrain: the autoscaler's drain_instance over tandem.v1.Admin/Drain, against an in-process
Admin server that answers as scripted: drained → True; not drained or failed → undone, False."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from router.autoscale.drain import AdminDrain
from tandem.v1 import admin_pb2, admin_pb2_grpc
from tests.aio import run


class Admin(admin_pb2_grpc.AdminServicer):
    """answer: instance_id → a DrainResponse state, or a grpc.StatusCode to abort with."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []

    async def Drain(self, request, context):
        self.requests.append(request)
        if request.undo:
            return admin_pb2.DrainResponse(state="serving")
        a = self.answer[request.instance_id]
        if isinstance(a, grpc.StatusCode):
            await context.abort(a, f"scripted {a.name}")
        return admin_pb2.DrainResponse(state=a, remaining=0 if a == "drained" else 3)


async def serving(admin):
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def kinds(admin):
    return [(r.instance_id, "undo" if r.undo else "drain") for r in admin.requests]


@run
async def test_drained_is_true_and_asks_to_wait_with_the_timeout():
    admin = Admin({"d1": "drained"})
    server, address = await serving(admin)
    drain = AdminDrain(address, timeout_s=42.0)
    try:
        assert await drain("d1") is True
        (req,) = admin.requests
        assert (req.instance_id, req.wait, req.timeout_s, req.undo) == ("d1", True, 42.0, False)
    finally:
        await drain.close()
        await drain.close()
        await server.stop(None)


@run
async def test_not_drained_in_time_is_undone_and_false():
    admin = Admin({"d1": "draining"})
    server, address = await serving(admin)
    drain = AdminDrain(address)
    try:
        assert await drain("d1") is False
        assert kinds(admin) == [("d1", "drain"), ("d1", "undo")]
    finally:
        await drain.close()
        await server.stop(None)


@pytest.mark.parametrize("code, undone", [
    (grpc.StatusCode.NOT_FOUND, False),          # no such instance: nothing to undo
    (grpc.StatusCode.UNIMPLEMENTED, False),      # a router without Drain
    (grpc.StatusCode.UNAVAILABLE, True),         # the instance went away mid-drain
])
def test_rpc_errors_are_false_never_raised(code, undone):
    async def body():
        admin = Admin({"d1": code})
        server, address = await serving(admin)
        drain = AdminDrain(address)
        try:
            assert await drain("d1") is False
            assert kinds(admin) == [("d1", "drain")] + ([("d1", "undo")] if undone else [])
        finally:
            await drain.close()
            await server.stop(None)
    asyncio.run(body())


@run
async def test_unreachable_router_is_false():
    server, address = await serving(Admin({}))
    await server.stop(None)
    drain = AdminDrain(address, timeout_s=1.0)
    try:
        assert await drain("d1") is False
    finally:
        await drain.close()


def test_bad_timeout():
    with pytest.raises(ValueError):
        AdminDrain("127.0.0.1:1", timeout_s=0)
