"""Multi-application, multi-turn workloads: the shape of traffic that prefix caching feeds on.

    apps:conversations=60,turns=uniform:1:4,think=2,rate=1,app=sys=512;input=uniform:32:96;output=uniform:16:64,app=sys=1024;input=64;output=normal:200:40;weight=2

Each `app=` is one application: a system prompt of `sys` tokens shared by every request of that
application, user messages of `input` tokens and answers of `output` tokens per turn (lengths as
in `synthetic:`: N, uniform:A:B, normal:MEAN:STD, choice:A:B:…; `sys` is drawn once per app),
and a `weight` (its share of conversations, default 1). Conversations start as a Poisson process
of `rate` per second; each has `turns` turns, `think` seconds apart on average (exponential).
Turn k re-sends the whole history: system prompt, then every earlier user message and answer,
then its own user message. So turn k's prompt begins with turn k-1's prompt, token for token.

The answers in the re-sent history are seeded stand-ins of the answer's length, not what the
server generated (an open-loop schedule is fixed before the run): a server's prefix cache can
serve the earlier prompt from the history, not the earlier answer. Turns are sent at their
scheduled times, whether or not the previous answer has arrived (open loop).

Prompts are built from segments (id, length): the tokens of a segment depend only on the seed
and its id, so equal segments give equal tokens across requests (workloads.make_prompt).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TAG = 5                       # the rng stream of this module (workloads.py uses 0..4)
TOP_KEYS = {"conversations", "turns", "think", "rate", "app"}
APP_KEYS = {"sys", "input", "output", "weight"}


@dataclass(frozen=True)
class AppSpec:
    """One application: length specs (workloads' length syntax) and a share of conversations."""
    sys: str = "512"
    input: str = "64"
    output: str = "64"
    weight: float = 1.0


@dataclass(frozen=True)
class ConversationSpec:
    apps: tuple[AppSpec, ...]
    conversations: int = 50
    turns: str = "1"
    think_s: float = 1.0
    rate: float = 1.0          # conversation starts per second


@dataclass(frozen=True)
class Turn:
    """One request of the workload (workloads.Row is built from it)."""
    timestamp_s: float
    input_tokens: int
    output_tokens: int
    segments: tuple[tuple[int, int], ...]     # (segment id, tokens), in prompt order
    app: int
    conversation: int
    turn: int


def parse_spec(text: str, error) -> ConversationSpec:
    """The ConversationSpec of an `apps:` spec (without the prefix). `error(message)` returns the
    exception to raise (workloads.WorkloadError), naming what to fix."""
    where = f"apps:{text}"
    apps: list[AppSpec] = []
    top: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in TOP_KEYS:
            raise error(f"{where}: unknown item {item!r}; use {', '.join(sorted(TOP_KEYS))} (app=sys=N;input=LEN;"
                        "output=LEN;weight=W)")
        if key == "app":
            fields = dict(f.partition("=")[::2] for f in value.split(";") if f)
            unknown = set(fields) - APP_KEYS
            if unknown or not fields:
                raise error(f"{where}: app {value!r}: unknown field(s) {sorted(unknown)}; use sys, input, output, weight")
            try:
                weight = float(fields.pop("weight", 1.0))
            except ValueError:
                raise error(f"{where}: app weight {fields.get('weight')!r} is not a number") from None
            if not weight > 0:
                raise error(f"{where}: app weight must be positive, got {weight}")
            apps.append(AppSpec(weight=weight, **fields))
        else:
            top[key] = value
    if not apps:
        raise error(f"{where}: give at least one app=sys=N;input=LEN;output=LEN")
    try:
        conversations = int(top.get("conversations", 50))
        think, rate = float(top.get("think", 1.0)), float(top.get("rate", 1.0))
    except ValueError:
        raise error(f"{where}: conversations must be an integer, think and rate numbers") from None
    if conversations <= 0 or think < 0 or rate <= 0:
        raise error(f"{where}: need conversations > 0, think >= 0 and rate > 0")
    return ConversationSpec(tuple(apps), conversations, top.get("turns", "1"), think, rate)


def generate(spec: ConversationSpec, seed: int, sampler) -> list[Turn]:
    """Every turn of every conversation, sorted by time. `sampler(text, rng)` returns a callable
    drawing a length (workloads' length syntax). Deterministic in (spec, seed)."""
    rng = np.random.default_rng([seed, _TAG])
    ids = iter(range(1, 1 << 62))
    app_sys = []
    draw = {}
    for a, app in enumerate(spec.apps):
        app_sys.append((next(ids), max(1, sampler(app.sys, rng)())))
        draw[a] = (sampler(app.input, rng), sampler(app.output, rng))
    turns_of = sampler(spec.turns, rng)
    weights = np.array([app.weight for app in spec.apps], dtype=float)
    start = np.cumsum(rng.exponential(1.0 / spec.rate, size=spec.conversations))
    start -= start[0]
    out: list[Turn] = []
    for c in range(spec.conversations):
        a = int(rng.choice(len(spec.apps), p=weights / weights.sum()))
        user, answer = draw[a]
        history = [app_sys[a]]
        t = float(start[c])
        for k in range(max(1, turns_of())):
            if k:
                t += float(rng.exponential(spec.think_s)) if spec.think_s > 0 else 0.0
            history.append((next(ids), max(1, user())))
            out_tokens = max(1, answer())
            out.append(Turn(t, sum(n for _, n in history), out_tokens, tuple(history), a, c, k))
            history.append((next(ids), out_tokens))          # the answer, re-sent by the next turn
    out.sort(key=lambda x: (x.timestamp_s, x.conversation, x.turn))
    return out
