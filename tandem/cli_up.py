"""`tandem up`: a local cluster in the foreground until Ctrl-C or SIGTERM."""
from __future__ import annotations

import argparse
import secrets
import signal
import sys
import time

from router.cluster.pools_args import DEFAULT_POOLS, POOL_MODES
from router.request.routing_args import DEFAULT_ROUTING, ROUTING_HELP, ROUTING_MODES
from router.request.admission import ADMISSION_MODES, DEFAULT_ADMISSION, DEFAULT_MAX_QUEUE_WAIT_S, DEFAULT_MAX_QUEUED
from router.request.sched_args import ADMISSION_HELP, QUEUE_POLICY_HELP, add_max_queued_arg
from router.settings import RouterSettings
from services.engine.queue_order import DEFAULT_QUEUE_POLICY, QUEUE_POLICIES
from services.engine.settings import EngineSettings
from services.auth import api_keys, cluster_token
from services.redis_url import url_argument
from services.settings import add_flags, default_of, help_of
from services.worker.settings import WorkerSettings

# Worker settings `tandem up` offers and forwards only when given (so a worker's default stays its own).
_FORWARDED = ((EngineSettings, ("block_size", "num_blocks", "kv_memory_gib", "max_num_batched_tokens", "max_num_seqs",
                                "max_model_len")),
              (WorkerSettings, ("lease_ms",)),
              (EngineSettings, ("device", "mixed_prefill", "preemption_mode", "kv_compress_fraction", "displace_ratio")),
              (WorkerSettings, ("kv_transport",)))


def register(sub) -> None:
    up = sub.add_parser("up", help="run a local cluster (Redis, router, workers) in the foreground")
    up.add_argument("--prefill", type=int, default=None, help="prefill instances (default 1 unless --colocated)")
    up.add_argument("--decode", type=int, default=None, help="decode instances (default 1 unless --colocated)")
    up.add_argument("--colocated", type=int, default=0, help="colocated instances (the baseline pool)")
    add_flags(up, EngineSettings, "model")
    add_flags(up, RouterSettings, "host", "port", helps={"port": "router " + help_of(RouterSettings, "port")})
    up.add_argument("--http-port", type=int, default=None,
                    help="also serve the OpenAI-compatible API (and /metrics) on this router port (0: a free one)")
    up.add_argument("--metrics-port", type=int, default=None,
                    help="Prometheus /metrics: the router on this port, worker i on port+1+i (0: free ports)")
    up.add_argument("--log-format", default=None, choices=["text", "json"],
                    help="every process's log format (json: one object per line, with request ids)")
    up.add_argument("--redis", default=None, type=url_argument,
                    help="use this Redis instead of starting one (redis://host:port/db or "
                         "redis+sentinel://host:port,.../service)")
    add_flags(up, RouterSettings, "cluster")
    up.add_argument("--pin-cores", action="store_true", help="put prefill and decode workers on different cores")
    up.add_argument("--pools", default=DEFAULT_POOLS, choices=POOL_MODES,
                    help="adaptive (default): the router switches instances between prefill, decode and both from "
                         "measured queues and the SLOs; fixed: roles never change")
    up.add_argument("--routing", default=DEFAULT_ROUTING, choices=ROUTING_MODES, help=ROUTING_HELP)
    up.add_argument("--queue-policy", default=DEFAULT_QUEUE_POLICY, choices=QUEUE_POLICIES,
                    help=QUEUE_POLICY_HELP.replace("Give the workers the same policy (tandem up does)",
                                                   "The router and every worker use it"))
    up.add_argument("--admission", default=DEFAULT_ADMISSION, choices=ADMISSION_MODES, help=ADMISSION_HELP)
    add_max_queued_arg(up)
    add_flags(up, EngineSettings, "dtype")
    for cls, names in _FORWARDED:               # given: passed on to every worker; else the workers' own default
        add_flags(up, cls, *names, defaults=dict.fromkeys(names),
                  helps={n: _forwarded_help(cls, n) for n in names})
    up.add_argument("--log-dir", default=None, help="write each child's log here instead of this terminal")
    up.add_argument("--api-key", action="append", default=[], metavar="KEY",
                    help="a client API key the router requires (repeatable; also TANDEM_API_KEYS, comma-separated; "
                         "none: the client APIs are open)")
    up.set_defaults(func=cmd_up)


def _forwarded_help(cls, name: str) -> str:
    default = default_of(cls, name)
    return help_of(cls, name) + " (for every worker" + ("" if default is None else f"; default {default}") + ")"


def _router_args(args) -> list[str]:
    return ["--queue-policy", args.queue_policy, "--admission", args.admission,
            "--max-queued-requests", str(getattr(args, "max_queued_requests", DEFAULT_MAX_QUEUED)),
            "--max-queue-wait-s", str(getattr(args, "max_queue_wait_s", DEFAULT_MAX_QUEUE_WAIT_S))]


def _worker_args(args) -> list[str]:
    out = ["--dtype", args.dtype]
    policy = getattr(args, "queue_policy", DEFAULT_QUEUE_POLICY)
    if policy != DEFAULT_QUEUE_POLICY:           # else the workers' own default (the same)
        out += ["--queue-policy", policy]
    for flag in (n for _, names in _FORWARDED for n in names):
        value = getattr(args, flag)
        if value is not None:
            out += ["--" + flag.replace("_", "-"), str(value)]
    return out


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


def cmd_up(args: argparse.Namespace) -> int:
    from tandem.local_cluster import ClusterStartError, LocalCluster
    from tandem.redis_server import RedisServerError

    prefill = args.prefill if args.prefill is not None else (0 if args.colocated else 1)
    decode = args.decode if args.decode is not None else (0 if args.colocated else 1)
    try:
        cluster = LocalCluster(args.model, prefill=prefill, decode=decode, colocated=args.colocated,
                               redis_url=args.redis, host=args.host, port=args.port, pin_cores=args.pin_cores,
                               worker_args=_worker_args(args), router_args=_router_args(args), cluster=args.cluster,
                               log_dir=args.log_dir, inherit_output=args.log_dir is None,
                               http_port=args.http_port, metrics_port=args.metrics_port, log_format=args.log_format,
                               pools=args.pools, routing=args.routing, api_keys=list(api_keys(args.api_key)),
                               # members only: worker RPCs and the KV data plane need the cluster token
                               cluster_token=cluster_token() or secrets.token_hex(16))
    except ValueError as e:
        print(f"tandem up: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_stop)     # from here on the finally block stops what started
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        cluster.start()
        extra = "".join(f" {k}={v}" for k, v in (("http", cluster.http_address),
                                                  ("metrics", cluster.metrics_address)) if v)
        print(f"ready {cluster.address}{extra}", flush=True)
        while True:                                  # until a signal, or a child dies
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    print(f"tandem up: {name} exited with code {proc.returncode}; stopping the cluster",
                          file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except _Stop:
        return 0
    except (ClusterStartError, RedisServerError) as e:
        print(f"tandem up: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second signal must not interrupt the cleanup
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.stop()
