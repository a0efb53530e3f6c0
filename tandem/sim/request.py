"""A simulated request: the engine's two counters plus what the report needs.

`arrival_time` and `priority` carry the engine Request's names, so the engine's own queue policy
(services/engine/policy.py) orders simulated requests as it orders real ones.
"""
from __future__ import annotations

from loadgen.metrics import RequestResult


class SimRequest:
    __slots__ = ("index", "request_id", "arrival_time", "priority", "prompt", "max_tokens", "computed", "out",
                 "blocks", "handoff", "result", "queued_since", "pause_cb", "migrating")

    def __init__(self, index: int, arrival_s: float, prompt: int, max_tokens: int, priority: int = 0):
        self.index = index
        self.request_id = f"r{index}"
        self.arrival_time = arrival_s
        self.priority = priority
        self.prompt, self.max_tokens = prompt, max_tokens
        self.computed = 0            # num_computed_tokens on the instance that holds it
        self.out = 0                 # output tokens so far (all instances)
        self.blocks = 0              # KV blocks it holds on that instance
        self.handoff = False         # leaves after its first token (a prefill instance's work)
        self.result = RequestResult(index, arrival_s, sent_s=arrival_s, input_tokens=prompt, max_tokens=max_tokens)
        self.queued_since = arrival_s
        self.pause_cb = None         # migration: called at the next step boundary, once paused
        self.migrating = False

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.out

    @property
    def is_decode(self) -> bool:
        return self.out > 0 and self.prompt + self.out - self.computed == 1

    @property
    def done(self) -> bool:
        return self.out >= self.max_tokens

    def emit(self, t: float, n: int) -> None:
        """n output tokens reached the client at t."""
        self.result.events.append((t, n))

    def finish(self, t: float) -> None:
        self.result.end_s = t

    def fail(self, t: float, error: str) -> None:
        self.result.error = error
        self.result.end_s = None
