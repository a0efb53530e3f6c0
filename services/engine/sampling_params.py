"""Per-request sampling parameters, validated once at the edge."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# OpenAI's ranges (one source for the router, the OpenAI API and the engine).
PENALTY_RANGE = (-2.0, 2.0)            # presence_penalty, frequency_penalty
LOGIT_BIAS_RANGE = (-100.0, 100.0)     # each logit_bias value


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

    Logit adjustments, applied to the raw logits before temperature, in vLLM's order: logit_bias
    (added to the named ids), min_tokens (EOS and stop_token_ids cannot be sampled before that many
    output tokens; stop strings are not held back), repetition_penalty (CTRL-style: a positive
    logit of a token seen in the prompt or output is divided by it, a negative one multiplied;
    1.0 is off), frequency_penalty (minus penalty x the token's count in the output) and
    presence_penalty (minus penalty once the token is in the output); 0 is off. Greedy rows see
    them too. min_p (after temperature) drops tokens whose probability is below min_p x the top
    token's; 0 is off. Logprobs stay those of the raw distribution.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()    # (token id, bias) pairs, ids unique
    min_p: float = 0.0
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when the output so far changes the logits (the sampler keeps token counts)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        """True when some step's logits are changed before sampling (False: the plain fast path)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]):
                raise InvalidRequestError(name, f"must be between {PENALTY_RANGE[0]:g} and {PENALTY_RANGE[1]:g} "
                                                f"(0 is off), got {value}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequestError("repetition_penalty", f"must be > 0 (1 is off), got {self.repetition_penalty}")
        if not (math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError("min_p", f"must be in [0, 1] (0 is off), got {self.min_p}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be between 0 and max_tokens ({self.max_tokens}), "
                                                    f"got {self.min_tokens!r}")
        seen = set()
        for t, bias in self.logit_bias:
            if not (isinstance(t, int) and 0 <= t < vocab_size):
                raise InvalidRequestError("logit_bias", f"token id {t!r} is outside the vocabulary [0, {vocab_size})")
            if t in seen:
                raise InvalidRequestError("logit_bias", f"token id {t} appears twice; give each id once")
            seen.add(t)
            if not (math.isfinite(bias) and LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1]):
                raise InvalidRequestError("logit_bias", f"the bias of token {t} must be between "
                                                        f"{LOGIT_BIAS_RANGE[0]:g} and {LOGIT_BIAS_RANGE[1]:g}, got {bias}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if self.stop and not self.detokenize:
            raise InvalidRequestError("stop", "stop strings need detokenize=True; drop one of them")
