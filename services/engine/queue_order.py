"""Queue ordering shared by the router's queue and the engines' waiting queues: pure functions.

Two policies (`--queue-policy` on the router, the workers and `tandem up`):

- `fcfs`: arrival order (the baseline).
- `sjf`: shortest predicted remaining work first (ALISE's speculative shortest-job-first), with
  priority classes first and aging:

      key = (-priority, not aged, arrival if aged else work, arrival)
      aged = waited >= aging_s

  Bound (the guarantee the docs state): once a request has waited `aging_s` seconds it is ordered
  before every request of its priority class that has waited less, and among aged requests by
  arrival. So from then on no request of its class that arrived after it is served before it:
  its wait is at most `aging_s` plus the time the requests of its class that arrived before it
  (and higher classes) take. A higher priority class always comes first, so a class can wait
  as long as higher ones keep arriving (that is what priority means here).

Work is counted in output-token steps: a request holds a batch slot for about one step per output
token, while prompt tokens go through many per step, so a prompt token counts PROMPT_TOKEN_COST of
an output token:

    work = prompt_tokens_left * PROMPT_TOKEN_COST + max(0, predicted_output_tokens - output_so_far)

Nothing here changes which tokens a request gets: ordering only decides when it runs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

FCFS, SJF = "fcfs", "sjf"
QUEUE_POLICIES = (FCFS, SJF)
DEFAULT_QUEUE_POLICY = FCFS           # sjf becomes the default once it wins `make bench-sched`
DEFAULT_AGING_S = 10.0                # sjf: after this many seconds of waiting a request is served by arrival
# A prompt token's share of an output token's cost: prefill runs hundreds of tokens per step, a
# decode one per request per step (on this project's CPU hosts a 512-token prefill costs about as
# much as 10-20 decode steps of a small batch).
PROMPT_TOKEN_COST = 1 / 32

T = TypeVar("T")


def check_policy(name: str, flag: str = "--queue-policy") -> str:
    """`name` when it is a queue policy; ValueError naming the flag and the choices otherwise."""
    if name not in QUEUE_POLICIES:
        raise ValueError(f"{flag} {name!r}: unknown queue policy; use one of {', '.join(QUEUE_POLICIES)}")
    return name


def remaining_work(prompt_tokens_left: int, predicted_output_tokens: float, output_tokens_so_far: int = 0) -> float:
    """Predicted work left, in output-token steps (module docstring). Never negative."""
    return max(0, prompt_tokens_left) * PROMPT_TOKEN_COST + max(0.0, predicted_output_tokens - output_tokens_so_far)


# sjf's displacement (SRPT with a margin, ALISE's preemptive side): with every batch slot taken, the
# waiting request first in order takes the slot of the running one with the most predicted work
# left when its own work is at most 1/DISPLACE_RATIO of that (less the victim's switch cost: its
# recompute, unless its KV is kept compressed), and that one has been displaced fewer than
# MAX_DISPLACEMENTS times. A request of a higher priority class, or aged, is never displaced.
DISPLACE_RATIO = 4.0
MAX_DISPLACEMENTS = 2


def displaces(head_work: float, victim_work: float, switch_cost: float, ratio: float = DISPLACE_RATIO) -> bool:
    """True when a waiting request of head_work should take the slot of a running one with
    victim_work left, switching it out costing switch_cost (all in output-token steps)."""
    return head_work * ratio < victim_work - switch_cost


def order_key(policy: str, *, priority: int, arrival: float, work: float, now: float,
              aging_s: float = DEFAULT_AGING_S) -> tuple:
    """The sort key of one waiting item: smaller goes first. fcfs: (arrival,). sjf: priority class
    first (higher priority first), then aged items by arrival, then the rest by work (ties by
    arrival)."""
    if policy == FCFS:
        return (arrival,)
    aged = now - arrival >= aging_s
    return (-priority, 0 if aged else 1, arrival if aged else work, arrival)


def ordered(items: Iterable[T], policy: str, now: float, fields: Callable[[T], tuple[int, float, float]],
            aging_s: float = DEFAULT_AGING_S) -> list[T]:
    """`items` in service order. fields(item) → (priority, arrival, work). Stable for equal keys."""
    def key(item: T) -> tuple:
        priority, arrival, work = fields(item)
        return order_key(policy, priority=priority, arrival=arrival, work=work, now=now, aging_s=aging_s)
    return sorted(items, key=key)


def position(items: Sequence[T], item: T, policy: str, now: float, fields: Callable[[T], tuple[int, float, float]],
             aging_s: float = DEFAULT_AGING_S) -> int:
    """How many of `items` (item excluded) go before `item`."""
    def key(x: T) -> tuple:
        priority, arrival, work = fields(x)
        return order_key(policy, priority=priority, arrival=arrival, work=work, now=now, aging_s=aging_s)
    mine = key(item)
    return sum(1 for x in items if x is not item and key(x) < mine)
