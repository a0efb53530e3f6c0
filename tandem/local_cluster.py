"""A whole cluster on this machine as child processes: Redis, workers and the router.

`tandem up`, `make demo`, the integration tests and the benchmarks all start clusters this way:

    with LocalCluster("small", prefill=1, decode=1, pin_cores=True) as cluster:
        Client(cluster.address).complete(prompt="Hi", max_tokens=8)
    # every child has exited here, Redis included

With `http_port` the router also serves the OpenAI-compatible API (`cluster.http_address`); with
`metrics_port` the router and every worker serve /metrics (`cluster.metrics_address`,
`cluster.worker_metrics[instance_id]`): 0 gives each a free port, P gives the router P and
worker i port P + 1 + i.

Children die with the thread that started them (PR_SET_PDEATHSIG), so even a SIGKILLed parent
leaves nothing behind; `stop()` is the orderly path: SIGTERM, a grace period, then SIGKILL.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from services.auth import API_KEYS_ENV, CLUSTER_TOKEN_ENV, CLUSTER_TOKEN_METADATA
from services.roles import WorkerState
from tandem.redis_server import RedisServer, spawn_with_parent
from tandem.v1 import admin_pb2, admin_pb2_grpc


class ClusterStartError(RuntimeError):
    """A child exited or the cluster did not become ready in time; the message has its log tail."""


@dataclass
class WorkerSpec:
    role: str
    instance_id: str
    cores: tuple[int, ...] = ()
    extra_args: list[str] = field(default_factory=list)


def plan_workers(prefill: int, decode: int, colocated: int, pin_cores: bool,
                 cores: list[int] | None = None) -> list[WorkerSpec]:
    """Instance ids and core pinning. With pin_cores, prefill and decode workers take different
    cores (prefill from the front of the core list, decode from the back); colocated instances
    take one core each, round robin."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    specs = []
    for i in range(prefill):
        specs.append(WorkerSpec("prefill", f"prefill-{i}", (cores[i % len(cores)],) if pin_cores else ()))
    for i in range(decode):
        specs.append(WorkerSpec("decode", f"decode-{i}", (cores[-1 - i % len(cores)],) if pin_cores else ()))
    for i in range(colocated):
        specs.append(WorkerSpec("colocated", f"colocated-{i}", (cores[i % len(cores)],) if pin_cores else ()))
    return specs


class LocalCluster:
    def __init__(self, model: str = "tiny", *, prefill: int = 1, decode: int = 1, colocated: int = 0,
                 redis_url: str | None = None, host: str = "127.0.0.1", port: int = 0, pin_cores: bool = False,
                 worker_args: list[str] | None = None, router_args: list[str] | None = None,
                 role_args: dict[str, list[str]] | None = None,
                 cluster: str = "default", log_dir: str | None = None, inherit_output: bool = False,
                 ready_timeout_s: float = 180.0, http_port: int | None = None, metrics_port: int | None = None,
                 log_format: str | None = None, pools: str | None = None,
                 routing: str | None = None, api_keys: list[str] | None = None, cluster_token: str | None = None,
                 env: Mapping[str, str] | None = None):
        """pools: the router's --pools (fixed | adaptive; None: the router's default, adaptive).
        routing: the router's --routing (load | prefix; None: the router's default, load).
        api_keys: client API keys the router requires (TANDEM_API_KEYS in its environment; None: open).
        cluster_token: the secret every child shares (TANDEM_CLUSTER_TOKEN; None: worker RPCs and the
        KV data plane are open, as in the tests, which call workers directly).
        env: more environment for every child, over this process's (e.g. TANDEM_TLS_* for mutual TLS
        between the members: services/member_tls.py)."""
        if prefill < 0 or decode < 0 or colocated < 0 or prefill + decode + colocated == 0:
            raise ValueError("a cluster needs at least one worker: give --prefill/--decode or --colocated")
        if (prefill == 0) != (decode == 0):
            raise ValueError("prefill and decode instances come in pairs of pools: give both --prefill and "
                             "--decode (or neither and --colocated)")
        for flag, value in (("--port", port), ("--http-port", http_port), ("--metrics-port", metrics_port)):
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{flag} {value}: give a port in 0..65535 (0: a free one)")
        self.model, self.host, self.port = model, host, port
        self.specs = plan_workers(prefill, decode, colocated, pin_cores)
        for spec in self.specs:                  # e.g. {"decode": ["--block-size", "32"]}
            spec.extra_args += list((role_args or {}).get(spec.role, []))
        self.redis_url, self.cluster = redis_url, cluster
        self.worker_args, self.router_args = list(worker_args or []), list(router_args or [])
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="tandem-cluster-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.inherit_output, self.ready_timeout_s = inherit_output, ready_timeout_s
        self.http_port, self.metrics_port, self.log_format = http_port, metrics_port, log_format
        self.pools, self.routing = pools, routing
        self.api_keys, self.cluster_token = list(api_keys or []), cluster_token
        self.env = dict(env or {})
        self.address = self.http_address = self.metrics_address = ""
        self.routers: dict[str, str] = {}            # router replica name → its gRPC address ("router" first)
        self._router_ports: dict[str, tuple] = {}     # name → (port, http port, metrics port) it restarts on
        self.worker_metrics: dict[str, str] = {}     # instance id → host:port of its /metrics
        self.redis: RedisServer | None = None
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        try:
            if self.redis_url is None:
                self.redis = RedisServer().start()
                self.redis_url = self.redis.url
            for spec in self.specs:
                self._spawn(spec.instance_id, self.worker_command(spec))
            self._spawn("router", self.router_command())
            self.address = self._wait_router_address("router")
            self.wait_instances(len(self.specs))
            if self.metrics_port is not None:
                self.worker_metrics = self._wait_worker_metrics()
        except BaseException:
            self.stop()
            raise
        return self

    def router_command(self, port: int | None = None, http_port: int | None = None,
                       metrics_port: int | None = None) -> list[str]:
        """The router's command line; port/http_port/metrics_port override the cluster's (a replica,
        a restart on the ports it had)."""
        http_port = self.http_port if http_port is None else http_port
        metrics_port = self.metrics_port if metrics_port is None else metrics_port
        cmd = [sys.executable, "-m", "router", "--model", self.model, "--redis", self.redis_url,
               "--cluster", self.cluster, "--host", self.host, "--port", str(self.port if port is None else port)]
        if http_port is not None:
            cmd += ["--http-port", str(http_port)]
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port)]
        if self.log_format:
            cmd += ["--log-format", self.log_format]
        if self.pools:
            cmd += ["--pools", self.pools]
        if self.routing:
            cmd += ["--routing", self.routing]
        return cmd + self.router_args

    def worker_command(self, spec: WorkerSpec) -> list[str]:
        cmd = [sys.executable, "-m", "services.worker", "--role", spec.role, "--model", self.model,
               "--redis", self.redis_url, "--cluster", self.cluster, "--instance-id", spec.instance_id,
               "--host", self.host]
        if spec.cores:
            cmd += ["--cpu-cores", ",".join(map(str, spec.cores))]
        if self.metrics_port is not None:
            port = self.metrics_port and self.metrics_port + 1 + self.specs.index(spec)
            cmd += ["--metrics-port", str(port)]
        if self.log_format:
            cmd += ["--log-format", self.log_format]
        return cmd + self.worker_args + spec.extra_args

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = None if self.inherit_output else open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        env = {**os.environ, **self.env}
        env.pop(CLUSTER_TOKEN_ENV, None)
        env.pop(API_KEYS_ENV, None)
        if self.cluster_token:
            env[CLUSTER_TOKEN_ENV] = self.cluster_token
        if self.api_keys and name.startswith("router"):
            env[API_KEYS_ENV] = ",".join(self.api_keys)
        # The router's stdout is read for its ready line; a worker's stdout (its own `ready ID ADDRESS`
        # line) joins its log: the log file, or this process's stderr when inheriting, so that the only
        # `ready` line on this process's stdout is the one `tandem up` prints for the router.
        stdout = subprocess.PIPE if name.startswith("router") else (out if out is not None else 2)
        proc = spawn_with_parent(cmd, env=env, stdout=stdout, stderr=out)
        if out is not None:
            out.close()
        self.procs[name] = proc
        return proc

    def add_router(self, name: str = "router-1") -> str:
        """Start another router replica of this cluster (same Redis, same workers; its own free
        ports) and return its gRPC address once it serves. Names start with "router"."""
        if not name.startswith("router") or name in self.procs:
            raise ValueError(f"router name {name!r}: give a new name starting with 'router'")
        # A replica takes free ports of its own: the first router's fixed ones would clash.
        self._spawn(name, self.router_command(0, None if self.http_port is None else 0,
                                              None if self.metrics_port is None else 0))
        return self._wait_router_address(name)

    def _port_of(self, address: str) -> int | None:
        return int(address.rsplit(":", 1)[1]) if address else None

    def _wait_router_address(self, name: str) -> str:
        """Read router `name`'s ready line; records its addresses (the first router's are the
        cluster's `address`, `http_address` and `metrics_address`)."""
        proc = self.procs[name]
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not select.select([proc.stdout], [], [], 0.5)[0]:     # never block past the deadline
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline().decode()
            if line.startswith("ready "):          # ready ADDRESS [http=HOST:PORT] [metrics=HOST:PORT]
                extra = dict(word.split("=", 1) for word in line.split()[2:] if "=" in word)
                address = line.split()[1]
                if name == "router":
                    self.http_address, self.metrics_address = extra.get("http", ""), extra.get("metrics", "")
                self.routers[name] = address
                self._router_ports[name] = (self._port_of(address), self._port_of(extra.get("http", "")),
                                            self._port_of(extra.get("metrics", "")))
                return address
            if not line and proc.poll() is not None:
                break
        raise ClusterStartError(f"{name} did not start: {self.log_tail(name)}")

    def wait_instances(self, count: int, timeout_s: float | None = None) -> list:
        """Block until the router lists `count` serving instances; returns their LoadReports."""
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        found: list = []
        with grpc.insecure_channel(self.address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            while True:
                self._check_children()
                try:
                    found = [i for i in admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=5,
                                                            metadata=self.admin_metadata()).instances
                             if i.state == WorkerState.SERVING]
                    if len(found) >= count:
                        return found
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"only {len(found)} of {count} instances "
                                            f"registered in time; logs in {self.log_dir}")
                time.sleep(0.2)

    def admin_metadata(self) -> tuple:
        """gRPC metadata that lets this process call the router's Admin API (the cluster token)."""
        return ((CLUSTER_TOKEN_METADATA, self.cluster_token),) if self.cluster_token else ()

    def _wait_worker_metrics(self) -> dict[str, str]:
        """Each worker's /metrics address, from its `ready ID ADDRESS metrics=HOST:PORT` line (in its
        log; with inherit_output only fixed ports are known)."""
        if self.metrics_port:
            return {spec.instance_id: f"{self.host}:{self.metrics_port + 1 + i}" for i, spec in enumerate(self.specs)}
        if self.inherit_output:
            return {}
        found: dict[str, str] = {}
        deadline = time.monotonic() + self.ready_timeout_s
        while len(found) < len(self.specs):
            for spec in self.specs:
                for line in self.log_tail(spec.instance_id, 1 << 20).splitlines():
                    words = line.split()
                    if words[:2] == ["ready", spec.instance_id] and words[-1].startswith("metrics="):
                        found[spec.instance_id] = words[-1].removeprefix("metrics=")
            if time.monotonic() > deadline:
                raise ClusterStartError(f"workers {sorted(set(s.instance_id for s in self.specs) - set(found))} "
                                        f"did not report a metrics address; logs in {self.log_dir}")
            self._check_children()
            if len(found) < len(self.specs):
                time.sleep(0.1)
        return found

    def _check_children(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ClusterStartError(f"{name} exited with code {proc.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str, n: int = 2000) -> str:
        path = os.path.join(self.log_dir, f"{name}.log")
        if not os.path.exists(path):
            return "(no log)"
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL one child (tests of peer death)."""
        proc = self.procs[name]
        proc.kill()
        proc.wait()

    def restart(self, name: str) -> None:
        """Start a worker or router that was killed (or exited) again with its original command. A
        worker registers anew (its new address in its new record); a router comes back on the
        ports it had (clients reconnect to the same address) and this returns once it serves.
        ValueError for an unknown or running child."""
        if name in self.routers:
            if self.procs[name].poll() is None:
                raise ValueError(f"{name} is still running; kill it first")
            self.procs[name].stdout.close()
            self._spawn(name, self.router_command(*self._router_ports[name]))
            self._wait_router_address(name)
            return
        spec = next((s for s in self.specs if s.instance_id == name), None)
        if spec is None:
            raise ValueError(f"{name!r} is not a worker of this cluster")
        if self.procs[name].poll() is None:
            raise ValueError(f"{name} is still running; kill it first")
        self._spawn(name, self.worker_command(spec))

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child (routers first), wait up to grace_s, SIGKILL the rest; stop Redis. Idempotent."""
        routers = [n for n in self.procs if n.startswith("router")]
        order = routers + [n for n in self.procs if n not in routers]
        for name in order:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for name in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
