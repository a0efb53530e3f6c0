"""The router's --routing flag: where a request goes, by load only or by prefix-cache overlap too."""
from __future__ import annotations

import argparse

ROUTING_MODES = ("load", "prefix")
DEFAULT_ROUTING = "load"
ROUTING_HELP = ("load (default): place by load only (predicted TTFT for prefill, freeness for decode and "
                "colocated); prefix: also credit each instance with the prompt blocks its prefix cache holds "
                "(workers publish their cache to Redis), so a shared system prompt or a conversation's history "
                "is computed where it is cached already")


def add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing", choices=ROUTING_MODES, default=DEFAULT_ROUTING, help=ROUTING_HELP)


def routing_kwargs(a: argparse.Namespace) -> dict:
    """Router(...) keyword arguments from the parsed flags."""
    return dict(routing=a.routing)
