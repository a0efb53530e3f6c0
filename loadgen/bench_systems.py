"""The systems `make bench-goodput` compares, each started and stopped around its probes.

    with start_system("fixed", opts) as handle:     # Unavailable(reason) when it cannot run here
        handle.url                                  # grpc://… or http://…

- `fixed`: Tandem, 1 prefill + 1 decode instance, each pinned to its own core.
- `fixed` runs with `pools="fixed"` (roles never change).
- `adaptive`: the same two instances with `pools="adaptive"` (the router moves them between roles),
  protecting `Options.adaptive_slo` (the run's tight SLOs) when set; Unavailable while
  `LocalCluster` has no `pools` argument.
- `colocated`: Tandem, 2 colocated instances, one per core (the baseline without disaggregation).
- `single`: Tandem, 1 colocated instance on every core (one torch thread per core, unpinned): the
  same hardware shape as vLLM's one server, so prefill gets both cores.
- `vllm`: vLLM's CPU OpenAI server (its venv from ../shared/peers) on an exported copy of the model,
  both cores.

Every system runs the same dtype: `host_dtype()`, what Tandem's `--dtype auto` picks on this host.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services import env

SYSTEMS = ("vllm", "fixed", "adaptive", "colocated", "single")
DEFAULT_SYSTEMS = SYSTEMS      # single too: on a 2-core host it is Tandem's best shape under tight SLOs
TANDEM_SHAPES = {"fixed": {"prefill": 1, "decode": 1, "pools": "fixed"},
                 "adaptive": {"prefill": 1, "decode": 1, "pools": "adaptive"},
                 "colocated": {"prefill": 0, "decode": 0, "colocated": 2},
                 "single": {"prefill": 0, "decode": 0, "colocated": 1}}
SPAN_ALL_CORES = frozenset({"single"})     # systems whose one instance uses every core, never pinned
PEERS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers"))


class Unavailable(Exception):
    """The system cannot run here; the message says why (it becomes the report's reason)."""


@dataclass(frozen=True)
class Options:
    model: str
    dtype: str
    out_dir: str
    pin_cores: bool = True
    vllm_venv: str = dataclasses.field(default_factory=env.peer_venv)
    vllm_start_timeout_s: float = 600.0
    adaptive_slo: tuple[float, float] | None = None    # (TTFT s, TPOT s) the adaptive router protects


@dataclass(frozen=True)
class Handle:
    url: str
    vocab: int | None = None        # when the target cannot tell (vLLM's /v1/models does not)


# ------------------------------------------------------------------------------------------- dtype

def host_dtype() -> tuple[str, str]:
    """(dtype, why): what Tandem's `--dtype auto` resolves to on this host's CPU (dtype_policy.py)."""
    from services.engine.dtype_policy import AUTO, detect_capabilities, resolve_dtype
    choice = resolve_dtype(AUTO, detect_capabilities("cpu"))
    return choice.dtype, f"--dtype auto: {choice.reason}"


def adaptive_support() -> str | None:
    """None when LocalCluster takes pools="adaptive", else why not."""
    from tandem.local_cluster import LocalCluster
    if "pools" in inspect.signature(LocalCluster.__init__).parameters:
        return None
    return "this checkout's LocalCluster has no pools= argument (adaptive pools not built yet)"


# ----------------------------------------------------------------------------------------- systems

def start_system(name: str, opts: Options):
    """A context manager yielding the running system's Handle; raises Unavailable before it runs."""
    if name in TANDEM_SHAPES:
        return _tandem(name, opts)
    if name == "vllm":
        return _vllm(opts)
    raise ValueError(f"unknown system {name!r}; one of {', '.join(SYSTEMS)}")


@contextmanager
def _tandem(name: str, opts: Options) -> Iterator[Handle]:
    from tandem.local_cluster import LocalCluster
    if name == "adaptive" and (why := adaptive_support()):
        raise Unavailable(why)
    router_args = []
    if name == "adaptive" and opts.adaptive_slo:
        router_args = ["--slo-ttft-s", f"{opts.adaptive_slo[0]:.6g}", "--slo-tpot-s", f"{opts.adaptive_slo[1]:.6g}"]
    pin = opts.pin_cores and name not in SPAN_ALL_CORES
    cluster = LocalCluster(opts.model, pin_cores=pin, worker_args=["--dtype", opts.dtype],
                           router_args=router_args, log_dir=os.path.join(opts.out_dir, f"{name}-logs"),
                           **TANDEM_SHAPES[name])
    try:
        cluster.start()
    except Exception as e:          # noqa: BLE001 - any start failure makes the system unavailable
        raise Unavailable(f"the cluster did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    try:
        yield Handle(f"grpc://{cluster.address}")
    finally:
        cluster.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _vllm(opts: Options) -> Iterator[Handle]:
    if not os.path.exists(os.path.join(opts.vllm_venv, "bin", "python")):
        raise Unavailable(f"vLLM's CPU venv not found at {opts.vllm_venv} (bash {PEERS}/setup-vllm-cpu.sh)")
    model_dir = os.path.join(opts.out_dir, f"model-{opts.model}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        done = subprocess.run([sys.executable, "-m", "tandem.cli", "export-model", opts.model, model_dir],
                              capture_output=True, text=True)
        if done.returncode:
            raise Unavailable(f"could not export {opts.model} for vLLM: {done.stderr.strip()[-300:]}")
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f).get("vocab_size")
    port = _free_port()
    script = (f'. "{PEERS}/env.sh" && exec "$PEER_VENV/bin/python" "{PEERS}/vllm_cli.py" serve "{model_dir}" '
              f"--host 127.0.0.1 --port {port} --load-format dummy --dtype {opts.dtype} --max-model-len 4096 --seed 0")
    log_path = os.path.join(opts.out_dir, "vllm.log")
    with open(log_path, "w") as log:
        server = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "PEER_VENV": opts.vllm_venv})
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", server, opts.vllm_start_timeout_s, log_path)
        yield Handle(f"http://127.0.0.1:{port}", vocab)
    finally:
        _stop_group(server)


def _stop_group(server: subprocess.Popen) -> None:
    """SIGINT the server's process group (the session it was started in), SIGKILL after 30 s."""
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(server.pid, signal.SIGKILL)        # a straggling child of that session
    except ProcessLookupError:
        pass
    server.wait()


def _wait_http(url: str, server: subprocess.Popen, timeout_s: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise Unavailable(f"vLLM's server exited with {server.returncode} before serving (see {log_path})")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise Unavailable(f"vLLM's server was not serving {url} after {timeout_s:.0f} s (see {log_path})")
