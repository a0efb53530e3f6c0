"""`tandem up` serves, then SIGTERM (or SIGINT) stops every process it started, Redis included."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tandem import Client

pytestmark = pytest.mark.timeout(300)


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"      # a zombie is as good as gone
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig,log_dir", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_up_serves_then_stops_everything(export_named, tmp_path, sig, log_dir):
    """Without --log-dir the children log to this terminal: still exactly one `ready` line on stdout
    (the router's), the workers' own ready lines go to their logs (stderr)."""
    cmd = [sys.executable, "-m", "tandem.cli", "up", "--model", export_named("tiny"), "--port", "0",
           "--num-blocks", "100"] + (["--log-dir", str(tmp_path)] if log_dir else [])
    err = open(tmp_path / "up.stderr", "w+")              # a file, not a pipe: children's logs never block
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), f"{line!r} {(tmp_path / 'up.stderr').read_text()}"
        address = line.split()[1]
        with Client(address) as c:
            r = c.complete(token_ids=[5, 6, 7, 8], max_tokens=5, ignore_eos=True)
        assert len(r.token_ids) == 5
        children = _descendants(proc.pid)
        names = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, children))],
                               capture_output=True, text=True).stdout
        assert "redis-server" in names and "services.worker" in names and "-m router" in names
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        rest = proc.stdout.read().splitlines()
        assert [w for w in rest if w.startswith("ready")] == [], rest
        if not log_dir:                                   # the workers' ready lines are in the log
            assert "ready prefill-0 " in (tmp_path / "up.stderr").read_text()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in children):
            assert time.monotonic() < deadline, f"left behind: {[p for p in children if _alive(p)]}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()


def test_up_refuses_half_a_pd_cluster(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tandem.cli", "up", "--prefill", "1", "--decode", "0", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--decode" in r.stderr and "Traceback" not in r.stderr
