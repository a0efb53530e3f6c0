"""services/allocator.py: an engine process re-executes itself under tcmalloc, once, where the
host has it; TANDEM_ALLOCATOR picks; a bad value or a required-but-missing library is a clear exit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A child that calls use_tcmalloc() then prints which allocator it runs and how often it started.
CHILD = ("import os, sys; sys.path.insert(0, %r); print('start', flush=True); "
         "from services import allocator; allocator.use_tcmalloc(); print(allocator.loaded(), os.getpid())" % ROOT)


def _run(env_extra: dict[str, str], extra_args=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV, allocator.environment.ALLOCATOR_REEXEC)}
    return subprocess.run([sys.executable, "-c", CHILD, *extra_args], env={**env, **env_extra},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(allocator.tcmalloc_path() is None, reason="libtcmalloc_minimal.so.4 not installed (make setup)")
def test_auto_reexecutes_once_under_tcmalloc_keeping_pid_and_arguments():
    out = _run({}, ["an-argument"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines.count("start") == 2                     # ran, re-executed itself once, ran again
    assert lines[-2] == "tcmalloc"


@pytest.mark.skipif(allocator.tcmalloc_path() is None, reason="libtcmalloc_minimal.so.4 not installed (make setup)")
def test_required_tcmalloc_with_the_library_loads_it():
    out = _run({allocator.ENV: "tcmalloc"})
    assert out.returncode == 0 and out.stdout.split()[-2] == "tcmalloc", out.stderr


def test_system_keeps_glibc_and_does_not_reexecute():
    out = _run({allocator.ENV: "system"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split().count("start") == 1 and out.stdout.split()[-2] == "system"


def test_missing_library_under_auto_keeps_going_and_under_tcmalloc_says_how_to_install(monkeypatch):
    monkeypatch.setattr(allocator, "TCMALLOC_PATHS", ("/nonexistent/libtcmalloc_minimal.so.4",))
    monkeypatch.setattr(allocator, "loaded", lambda: "system")
    monkeypatch.delenv("TANDEM_ALLOCATOR_REEXEC", raising=False)
    monkeypatch.setenv(allocator.ENV, "auto")
    allocator.use_tcmalloc()                               # returns: nothing to load
    monkeypatch.setenv(allocator.ENV, "tcmalloc")
    with pytest.raises(SystemExit, match="libtcmalloc-minimal4"):
        allocator.use_tcmalloc()


def test_unknown_choice_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(SystemExit, match="TANDEM_ALLOCATOR='jemalloc'.*auto, tcmalloc, system"):
        allocator.use_tcmalloc()
