"""A private `redis-server` process on a free local port, for `tandem up` and for tests.

    with RedisServer() as server:          # started and answering PING here
        use(server.url)                    # "redis://127.0.0.1:PORT/0"
    # stopped here; no process is left behind

The server keeps nothing on disk (`--save '' --appendonly no`). It runs in its own process group,
so a Ctrl-C aimed at the caller's terminal does not kill it before the caller's orderly shutdown,
and on Linux it is also killed when the thread that started it dies (PR_SET_PDEATHSIG): a parent
killed with SIGKILL does not leave an orphan behind. Call `start()` from a thread that lives as
long as the server (the main thread in `tandem up` and in tests).
"""
from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

_MISSING_BINARY = ("redis-server not found; install it (apt-get install redis-server) "
                   "or pass --redis URL")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class RedisServerError(RuntimeError):
    """redis-server is missing, exited during start-up, or did not answer PING in time."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serving_pid(host: str, port: int) -> int | None:
    """The process id of the redis-server answering on host:port, or None if none answers."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    line = reply.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0]
    return int(line)


def spawn_with_parent(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd, **popen_kwargs) for a child that gets SIGTERM when this process dies
    (Linux). `setpriv --pdeathsig TERM` (util-linux) in front of the command sets that after the
    fork, so no Python code runs between fork and exec: with a preexec_fn CPython runs its at-fork
    handlers in the child, gRPC's among them, which abort the child (an abseil mutex check) when
    other threads of this process are inside gRPC at that moment. Without setpriv, a preexec_fn."""
    setpriv = shutil.which("setpriv")
    if setpriv is not None and _LIBC is not None:
        return subprocess.Popen([setpriv, "--pdeathsig", "TERM", "--", *cmd], **popen_kwargs)
    parent = os.getpid()
    return subprocess.Popen(cmd, preexec_fn=lambda: die_with_parent(parent), **popen_kwargs)


def die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: die with the parent (Linux only)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:      # the parent died before prctl took effect
            os._exit(1)


class RedisServer:
    """One redis-server process. `start()` (or `with`) launches it; `stop()` ends it.

    port: None picks a free port (retrying if another process takes it first); a number is used
    as given. binary: path of redis-server, default the one on PATH.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 binary: str | None = None, start_timeout_s: float = 10.0):
        self.host, self._requested_port = host, port
        self._binary, self._start_timeout_s = binary, start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """redis://HOST:PORT/0. Raises RedisServerError before start()."""
        if self.port is None:
            raise RedisServerError("RedisServer.url read before start()")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> "RedisServer":
        """Launch and wait until it answers PING. Raises RedisServerError with the server's
        output when it cannot start. Calling start() on a running server raises too."""
        if self._proc is not None:
            raise RedisServerError(f"redis-server already running on port {self.port}")
        binary = self._binary or shutil.which("redis-server")
        if binary is None or not os.path.exists(binary):
            raise RedisServerError(_MISSING_BINARY)
        for attempt in itertools.count(1):
            port = self._requested_port or _free_port(self.host)
            try:
                self._launch(binary, port)
                return self
            except RedisServerError as e:
                self.stop()
                port_taken = "Address already in use" in str(e)
                if self._requested_port is not None or not port_taken or attempt == 3:
                    raise

    def _launch(self, binary: str, port: int) -> None:
        self._log = tempfile.TemporaryFile()
        args = [binary, "--port", str(port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        self._proc = spawn_with_parent(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.port = port
        atexit.register(self.stop)
        deadline = time.monotonic() + self._start_timeout_s
        # Compare pids: another server already on this port would answer for us.
        while _serving_pid(self.host, port) != self._proc.pid:
            if self._proc.poll() is not None:
                raise RedisServerError(f"redis-server on port {port} exited with code "
                                       f"{self._proc.returncode}: {self._output()}")
            if time.monotonic() > deadline:
                raise RedisServerError(f"redis-server on port {port} did not answer PING within "
                                       f"{self._start_timeout_s:.0f}s: {self._output()}")
            time.sleep(0.02)

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace").strip() or "(no output)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate, wait, kill after timeout_s. Safe to call twice or before start()."""
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
