"""A request inside the engine: two counters, num_computed_tokens chasing num_tokens."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from services.engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0      # queued; needs blocks and (re)computation
    RUNNING = 1      # holds blocks, scheduled every step
    PREEMPTED = 2    # lost its blocks; will recompute prompt + output so far
    FINISHED = 3
    PAUSED = 4       # held out of scheduling (keeps its blocks) while a migration copies its last blocks


class FinishReason(enum.IntEnum):
    STOP = 0         # EOS, a stop token id or a stop string
    LENGTH = 1       # max_tokens or the model's context
    ABORT = 2
    HANDOFF = 3      # leaves this instance alive: prefill done (KV goes to decode) or migrated


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    first_scheduled_time: float | None = None    # time.monotonic() when its first chunk ran
    handoff: bool = False      # prefill only: leaves with HANDOFF after its first token (its KV moves on)
    num_displaced: int = 0           # times sjf gave its batch slot to a shorter request (queue_order.py)
    prompt_key: int | None = field(default=None, repr=False)   # the scheduler's hash of the prompt (twins)
    predicted_output_tokens: int = 0   # the router's prediction (sjf orders by it); 0: unknown, max_tokens
    # Layered prefill (SchedulerConfig.mixed_prefill_mode): layers its uncomputed tokens have been
    # through, and their residual stream after them ([tokens, hidden] where the model runs; None at 0).
    layers_done: int = 0
    layer_hidden: object = field(default=None, repr=False)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
