"""The router's command-line flags for adaptive pools (role switching between prefill and decode)."""
from __future__ import annotations

import argparse

from router.cluster.role_policy import RolePolicyConfig

POOL_MODES = ("fixed", "adaptive")
DEFAULT_POOLS = "adaptive"


def add_pools_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adaptive pools (an instance switches between prefill, decode and both)")
    g.add_argument("--pools", choices=POOL_MODES, default=DEFAULT_POOLS,
                   help="adaptive (default): the leading router lets a decode instance take prefill chunks when the "
                        "prefill queue threatens the TTFT SLO, and a prefill instance decode when decode threatens "
                        "the TPOT SLO; fixed: roles never change")
    g.add_argument("--slo-ttft-s", type=float, default=RolePolicyConfig.ttft_slo_s,
                   help="the TTFT SLO adaptive pools protect (seconds)")
    g.add_argument("--slo-tpot-s", type=float, default=RolePolicyConfig.tpot_slo_s,
                   help="the TPOT SLO adaptive pools protect (seconds)")
    g.add_argument("--role-switch-dwell-s", type=float, default=RolePolicyConfig.dwell_s,
                   help="no instance switches twice within this many seconds")


def pools_kwargs(a: argparse.Namespace) -> dict:
    """Router(...) keyword arguments from the parsed flags. Raises SystemExit on a bad value."""
    for flag, value in (("--slo-ttft-s", a.slo_ttft_s), ("--slo-tpot-s", a.slo_tpot_s)):
        if not value > 0:
            raise SystemExit(f"{flag} {value}: give a positive number of seconds")
    if a.role_switch_dwell_s < 0:
        raise SystemExit(f"--role-switch-dwell-s {a.role_switch_dwell_s}: give 0 or more seconds")
    return dict(pools=a.pools, role_policy=RolePolicyConfig(ttft_slo_s=a.slo_ttft_s, tpot_slo_s=a.slo_tpot_s,
                                                            dwell_s=a.role_switch_dwell_s))
