"""The router's flags for queue order, SLO-aware admission and the output-length predictor."""
from __future__ import annotations

import argparse

from router.request.admission import ADMISSION_MODES, DEFAULT_ADMISSION, DEFAULT_MAX_QUEUE_WAIT_S, DEFAULT_MAX_QUEUED
from services.engine.queue_order import DEFAULT_AGING_S, DEFAULT_QUEUE_POLICY, QUEUE_POLICIES

QUEUE_POLICY_HELP = ("fcfs (default): arrival order; sjf: shortest predicted work first (prompt tokens left + the "
                     "predicted output left), priority classes first, aging after --queue-aging-s. Give the "
                     "workers the same policy (tandem up does)")
ADMISSION_HELP = ("none (default): admit everything; slo: refuse at once (RESOURCE_EXHAUSTED / HTTP 429 with "
                  "retry-after) a request whose predicted queueing + prefill time exceeds its slo.ttft_s (or "
                  "--slo-ttft-s)")


def add_sched_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("queue order and admission")
    g.add_argument("--queue-policy", choices=QUEUE_POLICIES, default=DEFAULT_QUEUE_POLICY, help=QUEUE_POLICY_HELP)
    g.add_argument("--queue-aging-s", type=float, default=DEFAULT_AGING_S,
                   help="sjf: a request that waited this long is served in arrival order (bounds its wait)")
    g.add_argument("--admission", choices=ADMISSION_MODES, default=DEFAULT_ADMISSION, help=ADMISSION_HELP)
    add_max_queued_arg(g)
    g.add_argument("--predictor-warm-start", default=None, metavar="FILE.jsonl",
                   help="teach the output-length predictor these completed requests first: one JSON object a line, "
                        "{\"prompt_token_ids\": [...], \"output_tokens\": N, \"max_tokens\": M}")


def add_max_queued_arg(p) -> None:
    """--max-queued-requests and --max-queue-wait-s, as the router and `tandem up` take them (a value
    below 1, or a negative wait, is a usage error)."""
    p.add_argument("--max-queued-requests", type=_at_least_one, default=DEFAULT_MAX_QUEUED, metavar="N",
                   help=f"refuse a request (RESOURCE_EXHAUSTED / HTTP 429 with retry-after) while N admitted requests "
                        f"still wait for their first token (default {DEFAULT_MAX_QUEUED}): bounds the router's queue "
                        f"and memory under a burst, whatever --admission says")
    p.add_argument("--max-queue-wait-s", type=_seconds, default=DEFAULT_MAX_QUEUE_WAIT_S, metavar="S",
                   help=f"refuse a request (RESOURCE_EXHAUSTED / HTTP 429 with retry-after) while the requests waiting "
                        f"for their first token would take longer than S seconds to start at the measured rate "
                        f"(default {DEFAULT_MAX_QUEUE_WAIT_S:g}; 0: no bound): after a burst the cluster is back to "
                        f"full goodput within about S seconds, whatever --admission says")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value}: give seconds >= 0 (0: no bound)")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return value


def sched_kwargs(a: argparse.Namespace) -> dict:
    """Router(...) keyword arguments from the parsed flags. Raises SystemExit on a bad value."""
    if not a.queue_aging_s > 0:
        raise SystemExit(f"--queue-aging-s {a.queue_aging_s}: give a positive number of seconds")
    return dict(queue_policy=a.queue_policy, queue_aging_s=a.queue_aging_s, admission=a.admission,
                max_queued_requests=a.max_queued_requests, max_queue_wait_s=a.max_queue_wait_s,
                predictor_warm_start=a.predictor_warm_start)
