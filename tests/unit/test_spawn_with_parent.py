"""tandem.redis_server.spawn_with_parent: a child started with it ends when the process that started
it is SIGKILLed (Linux), and no Python code runs in the child before exec (no preexec_fn: CPython's
at-fork handlers, gRPC's among them, stay out of the child)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tandem import redis_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")

PARENT = """
import sys, time
sys.path.insert(0, {root!r})
from tandem.redis_server import spawn_with_parent
child = spawn_with_parent(["sleep", "60"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def test_the_child_ends_when_its_parent_is_killed():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(root=root)], stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 10
    while _comm(child) != "sleep":           # setpriv set the signal and exec'd the command
        assert time.monotonic() < deadline, f"the child never became sleep: {_comm(child)!r}"
        time.sleep(0.01)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
        time.sleep(0.05)
    parent.stdout.close()


def test_no_preexec_fn_when_setpriv_is_there(monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, cmd, **kwargs):
            seen.update(cmd=cmd, kwargs=kwargs)
    monkeypatch.setattr(redis_server.subprocess, "Popen", Recorder)
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: "/usr/bin/setpriv")
    if redis_server._LIBC is None:
        pytest.skip("no libc prctl here")
    redis_server.spawn_with_parent(["redis-server", "--port", "1"], stdout=None)
    assert seen["cmd"] == ["/usr/bin/setpriv", "--pdeathsig", "TERM", "--", "redis-server", "--port", "1"]
    assert "preexec_fn" not in seen["kwargs"]
