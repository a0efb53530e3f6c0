"""drain_instance for the autoscaler, through the router's own tandem.v1.Admin/Drain RPC.

    drain = AdminDrain("127.0.0.1:50051", timeout_s=600)
    ok = await drain("tandem-decode-7f9c")    # True once the instance reports `drained`

Drain(wait=True) stops new work on the instance and migrates its requests away (the rescheduler's
drain policy) until it reports `drained` or timeout_s passes. When it does not end drained (the
timeout passed, the RPC failed, or the router has no Drain), this undoes the drain with
Drain(undo=True) so the instance serves again, and answers False: the autoscaler then keeps the
replica. Going through the public Admin API keeps the autoscaler independent of how migration
is implemented. Never raises on a gRPC error (it logs and answers False).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from services.auth import cluster_interceptors, cluster_token
from services.roles import WorkerState
from tandem.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

UNDO_TIMEOUT_S = 10.0


class AdminDrain:
    """Callable drain_instance(instance_id) -> bool over a channel opened at the first call to
    `address` (or to what it returns, when it is a function: a router's address is known only
    once it serves)."""

    def __init__(self, address: str | Callable[[], str], timeout_s: float = 600.0):
        if timeout_s <= 0:
            raise ValueError(f"AdminDrain timeout_s must be > 0, got {timeout_s}")
        self._address, self.timeout_s = address, timeout_s
        self._channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return self._address() if callable(self._address) else self._address

    def _stub(self) -> admin_pb2_grpc.AdminStub:
        if self._channel is None:
            # the cluster token lets the drain through when the router requires API keys (router/client_auth.py)
            self._channel = grpc.aio.insecure_channel(self.address, interceptors=cluster_interceptors(cluster_token()) or None)
        return admin_pb2_grpc.AdminStub(self._channel)

    async def __call__(self, instance_id: str) -> bool:
        stub = self._stub()
        try:
            r = await stub.Drain(admin_pb2.DrainRequest(instance_id=instance_id, wait=True,
                                                        timeout_s=self.timeout_s),
                                 timeout=self.timeout_s + 30)
        except grpc.aio.AioRpcError as e:
            log.warning("drain %s via %s failed: %s %s", instance_id, self.address,
                        e.code().name, e.details())
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                return False                 # nothing was started that needs undoing
            await self._undo(stub, instance_id)
            return False
        if r.state == WorkerState.DRAINED:
            return True
        log.warning("drain %s: still %s with %d request(s) after %.0fs; undoing", instance_id,
                    r.state, r.remaining, self.timeout_s)
        await self._undo(stub, instance_id)
        return False

    async def _undo(self, stub, instance_id: str) -> None:
        try:
            await stub.Drain(admin_pb2.DrainRequest(instance_id=instance_id, undo=True),
                             timeout=UNDO_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.warning("could not undo the drain of %s (%s %s); it stays out of placement until "
                        "`tandem admin drain --undo` or its pod is replaced", instance_id,
                        e.code().name, e.details())

    async def close(self) -> None:
        """Close the channel. Safe to call twice."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
