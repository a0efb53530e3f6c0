"""A simulated request: the engine's two counters plus what the report needs.

The attributes the engine's queue policies read (services/engine/policy.py: arrival_time, priority,
num_tokens, num_computed_tokens, num_output_tokens, handoff, predicted_output_tokens,
sampling_params.max_tokens) carry the engine Request's names, so those policies order simulated
requests as they order real ones.
"""
from __future__ import annotations

from loadgen.metrics import RequestResult


class SimRequest:
    __slots__ = ("index", "request_id", "arrival_time", "priority", "prompt", "max_tokens", "computed", "out",
                 "blocks", "handoff", "result", "queued_since", "pause_cb", "migrating", "num_displaced")

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
        self.num_displaced = 0       # sjf gave its batch slot to a shorter request (engine: Request.num_displaced)

    predicted_output_tokens = None   # no router prediction: policies fall back to max_tokens
    layers_done = 0                  # never part way through a layered prefill here

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.out

    @property
    def num_computed_tokens(self) -> int:
        return self.computed

    @property
    def num_output_tokens(self) -> int:
        return self.out

    @property
    def sampling_params(self) -> "SimRequest":
        """Only max_tokens is read through it (the engine's SamplingParams name)."""
        return self

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
