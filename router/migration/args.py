"""The router's command-line flags for live-migration rescheduling."""
from __future__ import annotations

import argparse

from router.migration.policy import PolicyConfig
from router.settings import RouterSettings
from services.settings import add_flags

POLICY_NAMES = ("drain", "defrag", "priority", "balance")


def add_rescheduler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rescheduling (live migration between decode instances)")
    g.add_argument("--no-reschedule", action="store_true", help="never migrate on its own (admin migrate/drain still work)")
    add_flags(g, RouterSettings, "reschedule_interval_ms")
    g.add_argument("--migration-policies", default=",".join(POLICY_NAMES),
                   help="comma-separated, in precedence order: " + ", ".join(POLICY_NAMES))
    g.add_argument("--migration-selector", default="shortest", choices=["shortest", "longest", "lowest_priority"],
                   help="which request a loaded instance moves")
    g.add_argument("--migration-gap", type=float, default=PolicyConfig.gap_threshold,
                   help="the freeness gap (free blocks per running request) worth a migration")


def rescheduler_kwargs(a: argparse.Namespace) -> dict:
    """Router(...) keyword arguments from the parsed flags. Raises SystemExit on a bad policy name."""
    policies = tuple(x.strip() for x in a.migration_policies.split(",") if x.strip())
    unknown = [x for x in policies if x not in POLICY_NAMES]
    if unknown:
        raise SystemExit(f"--migration-policies: unknown {', '.join(unknown)}; use some of {', '.join(POLICY_NAMES)}")
    policy = PolicyConfig(policies=policies, selector=a.migration_selector, gap_threshold=a.migration_gap)
    return dict(reschedule=not a.no_reschedule, reschedule_interval_s=a.reschedule_interval_ms / 1e3, policy=policy)
