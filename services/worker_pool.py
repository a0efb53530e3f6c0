"""gRPC channels to workers, one per address, reused by every request (router → worker and worker → worker)."""
from __future__ import annotations

import asyncio

import grpc

from services.auth import cluster_interceptors, cluster_token
from services.member_tls import MemberTLS, member_tls
from tandem.v1 import worker_pb2, worker_pb2_grpc

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class WorkerPool:
    """token: the cluster token sent on every call (services/auth.py); default TANDEM_CLUSTER_TOKEN.
    tls: mutual TLS to the workers (services/member_tls.py); default from TANDEM_TLS_* (None: plaintext).
    Raises MemberTLSError for incomplete TLS settings."""

    def __init__(self, token: str | None = None, tls: MemberTLS | None = None):
        self._interceptors = cluster_interceptors(token or cluster_token())
        self._tls = tls if tls is not None else member_tls()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._background: set[asyncio.Task] = set()

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            if self._tls is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                                    interceptors=self._interceptors or None)
            else:
                channel = grpc.aio.secure_channel(address, self._tls.channel_credentials(),
                                                  options=CHANNEL_OPTIONS + self._tls.channel_options(),
                                                  interceptors=self._interceptors or None)
            self._channels[address], stub = channel, worker_pb2_grpc.WorkerStub(channel)
            self._stubs[address] = stub
        return stub

    def release_later(self, address: str, request_id: str, metadata=None) -> None:
        """Fire-and-forget Release: frees what the worker holds for the request, whatever state it is in."""
        async def release():
            try:
                await self.stub(address).Release(worker_pb2.ReleaseRequest(request_id=request_id), timeout=5.0,
                                                 metadata=metadata)
            except grpc.aio.AioRpcError:
                pass          # the worker is gone: its blocks went with it, or its lease timer frees them
        task = asyncio.ensure_future(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def forget(self, live_addresses: set[str], grace_s: float = 30.0) -> None:
        """Close channels to addresses no registered instance has any more (its record expired).
        Calls still running on them get `grace_s` to finish; new calls open a fresh channel."""
        for address in list(self._channels):
            if address not in live_addresses:
                channel = self._channels.pop(address)
                self._stubs.pop(address, None)
                task = asyncio.ensure_future(channel.close(grace_s))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
