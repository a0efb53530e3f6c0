"""The router's autoscaler flags and the glue that runs the Autoscaler beside the router.

    add_autoscaler_args(parser)                     # --autoscale and its --autoscale-* options
    settings = autoscaler_settings(parser, args)    # None without --autoscale; parser.error on bad values
    await serve_with_autoscaler(router, settings, serve)

The Autoscaler reads loads from the router's registry, leads with the router's leader lock (the
one the rescheduler uses, `router.leader`; one of its own when the router has none), drains
through the router's Admin/Drain RPC and scales through the kubernetes client. Credentials are
loaded before the router starts: a router asked to autoscale without them stops at once with
AutoscalerSetupError rather than serving without scaling.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Awaitable, Callable

from router.autoscale.autoscaler import AutoscalerConfig, Band, Bounds, Pool

_DEFAULTS = AutoscalerConfig()


class AutoscalerSetupError(Exception):
    """The autoscaler cannot run (no Kubernetes credentials); the router should not start."""


@dataclasses.dataclass(frozen=True)
class AutoscalerSettings:
    config: AutoscalerConfig
    deployments: dict[Pool, str]
    namespace: str | None           # None: the pod's own namespace (or "default")
    kubeconfig: str | None
    interval_s: float
    drain_timeout_s: float
    drain_settle_s: float
    redis_url: str
    cluster: str


def _band(text: str) -> Band:
    try:
        down, target, up = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DOWN,TARGET,UP (three numbers), got {text!r}")
    return Band(down=down, target=target, up=up)


def _fmt(b: Band) -> str:
    return f"{b.down:g},{b.target:g},{b.up:g}"


def add_autoscaler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("autoscaling (prefill and decode Deployments, by the leader router)")
    g.add_argument("--autoscale", action="store_true",
                   help="scale the prefill and decode Deployments from the instance loads")
    g.add_argument("--autoscale-namespace", help="the Deployments' namespace (default: the pod's)")
    g.add_argument("--autoscale-prefill-deployment", help="the prefill Deployment's name")
    g.add_argument("--autoscale-decode-deployment", help="the decode Deployment's name")
    g.add_argument("--autoscale-kubeconfig",
                   help="kubeconfig file (default: in-cluster ServiceAccount, else $KUBECONFIG)")
    g.add_argument("--autoscale-interval-s", type=float, default=15.0, help="seconds between decisions")
    g.add_argument("--autoscale-ttft-slo-s", type=float, default=_DEFAULTS.ttft_slo_s,
                   help="time-to-first-token SLO; sizes prefill by queued prompt work")
    g.add_argument("--autoscale-tpot-slo-s", type=float, default=_DEFAULTS.tpot_slo_s,
                   help="time-per-output-token SLO; sizes decode by step time")
    for pool in Pool:
        g.add_argument(f"--autoscale-{pool.value}-min", type=int, default=1,
                       help=f"fewest {pool.value} replicas")
        g.add_argument(f"--autoscale-{pool.value}-max", type=int, default=8,
                       help=f"most {pool.value} replicas")
    for name, what in (("queue", "prefill queue wait ÷ TTFT SLO"), ("kv", "decode KV use"),
                       ("tpot", "decode step time ÷ TPOT SLO")):
        g.add_argument(f"--autoscale-{name}-band", type=_band, default=getattr(_DEFAULTS, name),
                       metavar="DOWN,TARGET,UP",
                       help=f"{what}: scale down below DOWN, size toward TARGET, scale up above "
                            f"UP (default {_fmt(getattr(_DEFAULTS, name))})")
    g.add_argument("--autoscale-up-cooldown-s", type=float, default=_DEFAULTS.scale_up_cooldown_s)
    g.add_argument("--autoscale-down-cooldown-s", type=float,
                   default=_DEFAULTS.scale_down_cooldown_s)
    g.add_argument("--autoscale-down-stabilization-s", type=float,
                   default=_DEFAULTS.scale_down_stabilization_s,
                   help="a pool must stay below its band this long before it shrinks")
    g.add_argument("--autoscale-drain-timeout-s", type=float, default=600.0,
                   help="longest wait for a decode instance to drain before keeping it")
    g.add_argument("--autoscale-drain-settle-s", type=float, default=15.0,
                   help="wait after a drain before removing the replica (the pod turns unready)")


def autoscaler_settings(p: argparse.ArgumentParser, a: argparse.Namespace) -> AutoscalerSettings | None:
    """The validated settings, or None without --autoscale. Calls p.error (exit 2) on a missing
    Deployment name or values the policy refuses. Needs a.redis_url and a.cluster."""
    if not a.autoscale:
        return None
    deployments = {Pool.PREFILL: a.autoscale_prefill_deployment,
                   Pool.DECODE: a.autoscale_decode_deployment}
    missing = [f"--autoscale-{p_.value}-deployment" for p_, n in deployments.items() if not n]
    if missing:
        p.error(f"--autoscale needs {' and '.join(missing)}")
    try:
        config = AutoscalerConfig(
            ttft_slo_s=a.autoscale_ttft_slo_s, tpot_slo_s=a.autoscale_tpot_slo_s,
            prefill=Bounds(a.autoscale_prefill_min, a.autoscale_prefill_max),
            decode=Bounds(a.autoscale_decode_min, a.autoscale_decode_max),
            queue=a.autoscale_queue_band, kv=a.autoscale_kv_band, tpot=a.autoscale_tpot_band,
            scale_up_cooldown_s=a.autoscale_up_cooldown_s,
            scale_down_cooldown_s=a.autoscale_down_cooldown_s,
            scale_down_stabilization_s=a.autoscale_down_stabilization_s)
        for flag in ("interval_s", "drain_timeout_s"):
            if not getattr(a, f"autoscale_{flag}") > 0:
                raise ValueError(f"--autoscale-{flag.replace('_', '-')} must be > 0")
        if a.autoscale_drain_settle_s < 0:
            raise ValueError("--autoscale-drain-settle-s must be >= 0")
    except ValueError as e:
        p.error(f"autoscaler: {e}")
    return AutoscalerSettings(config, deployments, a.autoscale_namespace, a.autoscale_kubeconfig,
                              a.autoscale_interval_s, a.autoscale_drain_timeout_s,
                              a.autoscale_drain_settle_s, a.redis_url, a.cluster)


def local_address(listen: str) -> str:
    """Where this process reaches a server listening on `listen` (host:port): a wildcard host
    becomes the loopback address."""
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "::", "") else listen


async def serve_with_autoscaler(router, settings: AutoscalerSettings,
                                serve: Callable[[object], Awaitable[None]]) -> None:
    """Run `serve(router)` with the Autoscaler beside it, and stop the Autoscaler after.
    Raises AutoscalerSetupError before serving when there are no Kubernetes credentials."""
    from router.autoscale.drain import AdminDrain
    from router.autoscale.loop import Autoscaler
    from router.autoscale.k8s_scaler import DeploymentScaler, ScalerConfigError, default_namespace, load_api_client
    from router.cluster.leader_lock import LeaderLock

    try:
        api = load_api_client(settings.kubeconfig)
    except ScalerConfigError as e:
        raise AutoscalerSetupError(str(e)) from None
    scaler = DeploymentScaler(api, settings.namespace or default_namespace())
    leader = getattr(router, "leader", None)
    own_lock = LeaderLock(settings.redis_url, settings.cluster) if leader is None else None
    drain = AdminDrain(lambda: local_address(router.address), timeout_s=settings.drain_timeout_s)
    autoscaler = Autoscaler(settings.config, deployments=settings.deployments, scaler=scaler,
                            loads=router.registry.all, leader=leader or own_lock,
                            drain_instance=drain, interval_s=settings.interval_s,
                            drain_timeout_s=settings.drain_timeout_s + 60,
                            drain_settle_s=settings.drain_settle_s)
    if own_lock is not None:
        await own_lock.start()
    autoscaler.start()
    try:
        await serve(router)
    finally:
        await autoscaler.stop()
        await drain.close()
        if own_lock is not None:
            await own_lock.stop()
        api.close()
