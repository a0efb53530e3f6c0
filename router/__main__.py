"""`python -m router --model DIR|NAME --redis URL [--port P]`: the router process."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from router.autoscaler_cli import (AutoscalerSetupError, add_autoscaler_args, autoscaler_settings,
                                    serve_with_autoscaler)
from router.server import Router, serve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m router", description="Tandem router: the cluster's front door")
    p.add_argument("--model", default="tiny", help="the model the workers serve (HF directory or named model)")
    p.add_argument("--redis", dest="redis_url", required=True, help="redis://host:port/db of the registry")
    p.add_argument("--cluster", default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: a free one)")
    p.add_argument("--lease-ms", type=int, default=30_000, help="decode reservation lease")
    p.add_argument("--poll-interval-s", type=float, default=0.5, help="how often the registry is read")
    add_autoscaler_args(p)
    a = p.parse_args(argv)
    autoscale = autoscaler_settings(p, a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from services.engine.config import ModelConfigError
    try:
        router = Router(a.model, a.redis_url, cluster=a.cluster, host=a.host, port=a.port, lease_ms=a.lease_ms,
                        poll_interval_s=a.poll_interval_s)
        asyncio.run(serve(router) if autoscale is None else serve_with_autoscaler(router, autoscale, serve))
    except (ModelConfigError, OSError, AutoscalerSetupError) as e:
        print(f"tandem router: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
