"""The transfer watchdog: expiry, cancellation, and the control plane failing fast through it.

The device path below stands in for an NCCL send whose peer never posts the receive (a GPU and
NCCL cannot exist here): its markers never complete, exactly like a hung NCCL operation's event.
"""
from __future__ import annotations

import threading

import pytest
import torch

from services.transport import KVLayout, KVTransportError, make_receiver, make_sender
from services.transport import control_connection
from services.transport.paths import SendPath, TcpSendPath
from services.transport.watchdog import Watchdog, WatchdogExpired, wait


class Marker:
    """A completion marker (the CUDA event's `query`) that completes when told to."""

    def __init__(self, done: bool = False):
        self._done = threading.Event()
        if done:
            self._done.set()

    def complete(self) -> None:
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()


def test_expired_marker_calls_on_expire_exactly_once():
    dog = Watchdog(poll_s=0.005)
    fired = []
    expired = threading.Event()
    try:
        dog.watch(Marker(), 0.02, lambda: (fired.append(1), expired.set()))
        assert expired.wait(10)
        dog.watch(Marker(done=True), 0.0, lambda: fired.append("never"))   # done: never expires
        done_later = Marker()
        dog.watch(done_later, 60, lambda: fired.append("never"))
        done_later.complete()
        key = dog.watch(Marker(), 0.0, lambda: fired.append("never"))
        dog.cancel(key)
        last = threading.Event()
        dog.watch(Marker(), 0.01, last.set)                              # fires after the ones above
        assert last.wait(10)
        assert fired == [1] and dog.expired == 2 and dog.pending() == 0
    finally:
        dog.close()
    with pytest.raises(RuntimeError, match="closed"):
        dog.watch(Marker(), 1, lambda: None)


def test_close_stops_every_pending_watch():
    dog = Watchdog(poll_s=0.005)
    fired = []
    dog.watch(Marker(), 3600, lambda: fired.append(1))
    dog.close()
    dog.close()                 # idempotent
    assert fired == [] and dog.pending() == 0


def test_wait_returns_when_done_and_aborts_when_not():
    wait(Marker(done=True), 0.0, lambda: pytest.fail("not expired"), "x")
    aborted = []
    with pytest.raises(WatchdogExpired, match="an NCCL receive did not complete within 0.01s"):
        wait(Marker(), 0.01, lambda: aborted.append(1), "an NCCL receive")
    assert aborted == [1]
    assert issubclass(WatchdogExpired, OSError)        # the connection's reader treats it as a dead peer


class HungDevicePath(SendPath):
    """Sends the payload inline (so the receiver is a real one), but also registers, like the nccl
    path, a device operation with the sender's watchdog; that operation never completes."""

    def __init__(self, inner: TcpSendPath, watchdog: Watchdog, on_broken, timeout_s: float):
        self.inner, self.watchdog, self.on_broken, self.timeout_s = inner, watchdog, on_broken, timeout_s
        self.aborted = threading.Event()

    def stage(self, src_block_ids, layer_start, layer_end):
        return self.inner.stage(src_block_ids, layer_start, layer_end)

    def emit(self, staged):
        self.watchdog.watch(Marker(), self.timeout_s, self._expired)
        return self.inner.emit(staged)

    def _expired(self):
        self.aborted.set()                          # the nccl path aborts its communicator here
        self.on_broken(f"an NCCL send did not complete within {self.timeout_s:g}s; the communicator was aborted")


def test_a_hung_device_send_fails_the_transfer_through_the_watchdog_not_the_commit_timeout(monkeypatch):
    paths = []

    def send_path(transport, kv, layout, timeout_s, watchdog, on_broken):
        path = HungDevicePath(TcpSendPath(kv, layout), watchdog or sender.watchdog(), on_broken, 0.05)
        paths.append(path)
        return path
    monkeypatch.setattr(control_connection, "send_path", send_path)
    src, dst = torch.ones(4, 2, 2, 4, 1, 8), torch.zeros(4, 2, 2, 4, 1, 8)
    layout = KVLayout.of(src, "tiny")
    receiver = make_receiver("tcp", layout, dst, timeout_s=10)
    sender = make_sender("tcp", layout, timeout_s=10)
    release = threading.Event()
    try:
        receiver.expect("r", [0, 1], lambda *_: release.wait())     # no ACK until the test ends: commit waits
        transfer = sender.open("r", receiver.address, src)
        transfer.push([0, 1], 0, 0, 2)
        # a commit timeout of an hour: only the watchdog can end this in time for the test
        with pytest.raises(KVTransportError, match="an NCCL send did not complete within 0.05s"):
            transfer.commit(8, {}, timeout=3600)
        assert paths[0].aborted.is_set()
        stats = sender.stats()
        assert stats["failures"] == 1 and stats["connections"] == 0       # the broken connection left the pool
        receiver.expect("r2", [2], lambda *_: None)
        again = sender.open("r2", receiver.address, src)                 # a new connection, a new path
        assert again.conn is not transfer.conn and len(paths) == 2
        again.abort("done")
    finally:
        release.set()
        sender.close()
        receiver.close()
