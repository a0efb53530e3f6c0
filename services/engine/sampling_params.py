"""Per-request sampling parameters, validated once at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request a user can fix: `field` names the offending field, the message says how."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters.
    seed: same seed gives the same tokens whatever else is in the batch (randomness
    is keyed by (seed, output index), so it also survives preemption and migration).
    logprobs: None returns none; 0 returns the chosen token's logprob; n > 0 adds the top n.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    detokenize: bool = True          # False: token ids only (no text, no stop strings), as in vLLM
    max_logprobs: int = field(default=20, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int, max_tokens_limit: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field; a no-op when all are valid."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise InvalidRequestError(
                "max_tokens", f"{self.max_tokens} exceeds the limit {max_tokens_limit}; lower it")
        if self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not (0 <= self.logprobs <= self.max_logprobs):
            raise InvalidRequestError("logprobs", f"must be between 0 and {self.max_logprobs}, got {self.logprobs}")
        for t in self.stop_token_ids:
            if not (0 <= t < vocab_size):
                raise InvalidRequestError("stop_token_ids", f"id {t} is outside the vocabulary [0, {vocab_size})")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if self.stop and not self.detokenize:
            raise InvalidRequestError("stop", "stop strings need detokenize=True; drop one of them")
