"""`python -m router --model DIR|NAME --redis URL [--port P] [--http-port P] [--metrics-port P]`: the router."""
from __future__ import annotations

import argparse
import asyncio
import sys

from router.autoscale.cli import (AutoscalerSetupError, add_autoscaler_args, autoscaler_settings,
                                  serve_with_autoscaler)
from router.cluster.pools_args import add_pools_args, pools_kwargs
from router.migration.args import add_rescheduler_args, rescheduler_kwargs
from router.request.routing_args import add_routing_args, routing_kwargs
from router.request.sched_args import add_sched_args, sched_kwargs
from router.server import Router, serve
from router.settings import RouterSettings
from services import log_setup
from services.auth import api_keys
from services.redis_url import url_argument
from services.settings import add_flags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m router", description="Tandem router: the cluster's front door")
    add_flags(p, RouterSettings, "model")
    p.add_argument("--redis", dest="redis_url", required=True, type=url_argument,
                   help="redis://host:port/db (or redis+sentinel://host:port,.../service) of the registry")
    add_flags(p, RouterSettings, "cluster", "host", "port", "lease_ms", "poll_interval_s", "queue_timeout_s")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models), "
                        "/metrics and /health over HTTP on this port (0: a free one; default: off)")
    p.add_argument("--http-host", default=None, help="address for --http-port (default: --host)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve only Prometheus /metrics and /health on this port (0: a free one; default: off)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a client API key the router requires (repeatable; also TANDEM_API_KEYS, comma-separated; "
                        "none: the client APIs are open). Prefer the environment: flags show in `ps`")
    log_setup.add_arguments(p)
    add_rescheduler_args(p)
    add_pools_args(p)
    add_routing_args(p)
    add_sched_args(p)
    add_autoscaler_args(p)
    a = p.parse_args(argv)
    autoscale = autoscaler_settings(p, a)
    for flag, port in (("--http-port", a.http_port), ("--metrics-port", a.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            p.error(f"{flag} {port}: give a port in 0..65535 (0: a free one)")
    log_setup.configure("router", a.log_format, a.log_level)
    from services.engine.config import ModelConfigError
    try:
        router = Router(a.model, a.redis_url, api_keys=api_keys(a.api_key), cluster=a.cluster, host=a.host, port=a.port, lease_ms=a.lease_ms,
                        poll_interval_s=a.poll_interval_s, queue_timeout_s=a.queue_timeout_s, http_port=a.http_port,
                        metrics_port=a.metrics_port, http_host=a.http_host,
                        **rescheduler_kwargs(a), **pools_kwargs(a), **routing_kwargs(a), **sched_kwargs(a))
        asyncio.run(serve(router) if autoscale is None else serve_with_autoscaler(router, autoscale, serve))
    except (ModelConfigError, OSError, ValueError, AutoscalerSetupError) as e:
        print(f"tandem router: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
