"""A watchdog for device transfers that have no timeout of their own.

NCCL has no timeout: a send whose peer never posts the matching receive (the peer died, or hung)
blocks its stream forever. The transport records a completion marker (a CUDA event) after each
operation it enqueues and hands it here with a deadline; a single thread polls the pending
markers and, when one is still not done at its deadline, calls its ``on_expire`` exactly once
(the transport aborts the communicator there, which fails every transfer on it). ``wait`` is the
synchronous form for a thread that needs the operation finished before it goes on.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Marker(Protocol):
    def query(self) -> bool:
        """True once the operation it follows has completed (torch.cuda.Event.query)."""


class WatchdogExpired(TimeoutError):
    """An operation was not done by its deadline; its on_expire has run."""


def wait(marker: Marker, timeout_s: float, on_expire: Callable[[], None], what: str,
         poll_s: float = 0.0005) -> None:
    """Block until ``marker`` is done. If ``timeout_s`` passes first, call ``on_expire()`` (which
    must make the operation end, e.g. abort its communicator) and raise WatchdogExpired."""
    deadline = time.monotonic() + timeout_s
    delay = poll_s / 8
    while not marker.query():
        if time.monotonic() >= deadline:
            on_expire()
            raise WatchdogExpired(f"{what} did not complete within {timeout_s:g}s")
        time.sleep(delay)
        delay = min(delay * 2, poll_s)


class Watchdog:
    """One polling thread for any number of pending operations. Thread-safe; ``close`` joins it."""

    def __init__(self, poll_s: float = 0.05, name: str = "kv-watchdog"):
        self.poll_s = poll_s
        self._lock = threading.Condition()
        self._pending: dict[int, tuple[Marker, float, Callable[[], None]]] = {}
        self._keys = itertools.count()
        self._closed = False
        self.expired = 0                      # on_expire calls so far
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def watch(self, marker: Marker, timeout_s: float, on_expire: Callable[[], None]) -> int:
        """Watch ``marker`` until done; past ``timeout_s`` from now call ``on_expire()`` once (on the
        watchdog thread; it must not block for long). Returns a key for ``cancel``. Raises
        RuntimeError after close()."""
        with self._lock:
            if self._closed:
                raise RuntimeError("watch() on a closed watchdog")
            key = next(self._keys)
            self._pending[key] = (marker, time.monotonic() + timeout_s, on_expire)
            self._lock.notify()
            return key

    def cancel(self, key: int) -> None:
        """Stop watching ``key``; a safe no-op for a done, expired or unknown key."""
        with self._lock:
            self._pending.pop(key, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        """Stop watching everything (no on_expire runs after this returns) and join. Idempotent."""
        with self._lock:
            self._closed = True
            self._pending.clear()
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                items = list(self._pending.items())
            now = time.monotonic()
            expired = []
            for key, (marker, deadline, on_expire) in items:
                if marker.query():
                    self.cancel(key)
                elif now >= deadline:
                    with self._lock:
                        if self._pending.pop(key, None) is not None:
                            expired.append(on_expire)
            for on_expire in expired:
                self.expired += 1
                on_expire()
            with self._lock:
                if self._pending and not self._closed:
                    self._lock.wait(self.poll_s)
