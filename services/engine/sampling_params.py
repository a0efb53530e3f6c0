"""Per-request sampling parameters, validated once at the edge."""
from __future__ import annotations

import enum
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


# A request id names the request in logs, metrics and the KV transport's frames (a 16-bit length).
MAX_REQUEST_ID_CHARS = 256
# Worker-side ids add the router's suffixes to the client's (an attempt `~rN`, a choice `#cN`).
MAX_WORKER_REQUEST_ID_CHARS = MAX_REQUEST_ID_CHARS + 64


def check_request_id(request_id: str, limit: int = MAX_REQUEST_ID_CHARS) -> None:
    """Raises InvalidRequestError naming `request_id` unless it is at most `limit` printable characters."""
    if len(request_id) > limit or not request_id.isprintable():
        raise InvalidRequestError("request_id", f"must be at most {limit} printable characters")


class StructuredKind(enum.IntEnum):
    """What a structured-output constraint is (values as tandem.v1.StructuredKind)."""
    JSON_OBJECT = 1      # any JSON object
    JSON_SCHEMA = 2      # spec: a JSON schema as JSON text
    REGEX = 3            # spec: a regular expression the whole output matches
    CHOICE = 4           # choices: the output is exactly one of them
    GRAMMAR = 5          # spec: a Lark grammar (llguidance's dialect, `start` the root rule)


MAX_STRUCTURED_SPEC_CHARS = 1 << 20     # a schema or grammar larger than 1 MiB is refused


@dataclass(frozen=True)
class StructuredOutput:
    """A structured-output constraint (services/engine/grammar.py compiles and enforces it).

    Its grammar state is a function of the request's output tokens alone, so any instance that
    samples for the request rebuilds it from the output so far (KV handoff, migration, recompute).
    """
    kind: StructuredKind
    spec: str = ""
    choices: tuple[str, ...] = ()

    def validate(self) -> None:
        """The shape checks; whether the schema or grammar compiles is grammar.check_structured's."""
        name = "structured_output"
        if self.kind == StructuredKind.CHOICE:
            if not self.choices or any(not isinstance(c, str) or not c for c in self.choices):
                raise InvalidRequestError(name, "choice needs a non-empty list of non-empty strings")
            if self.spec:
                raise InvalidRequestError(name, "a choice constraint takes choices, not a spec")
        elif self.kind == StructuredKind.JSON_OBJECT:
            if self.spec or self.choices:
                raise InvalidRequestError(name, "json_object takes no spec or choices")
        elif self.kind in (StructuredKind.JSON_SCHEMA, StructuredKind.REGEX, StructuredKind.GRAMMAR):
            if not self.spec:
                raise InvalidRequestError(name, f"{self.kind.name.lower()} needs a non-empty spec")
            if self.choices:
                raise InvalidRequestError(name, f"{self.kind.name.lower()} takes a spec, not choices")
        else:
            raise InvalidRequestError(name, f"unknown kind {self.kind!r}")
        size = len(self.spec) + sum(len(c) for c in self.choices)
        if size > MAX_STRUCTURED_SPEC_CHARS:
            raise InvalidRequestError(name, f"is {size} characters; at most {MAX_STRUCTURED_SPEC_CHARS} are accepted")


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

    structured_output: the output is constrained to a JSON schema, a regex, a choice or a grammar
    (StructuredOutput); the grammar's mask comes after every adjustment above, and where the grammar
    is complete and cannot go on, EOS is forced even before min_tokens. Not with ignore_eos.
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
    structured_output: StructuredOutput | None = None

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
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0 or self.structured_output is not None

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
        if self.structured_output is not None:
            self.structured_output.validate()
            if self.ignore_eos:
                raise InvalidRequestError("ignore_eos", "cannot be combined with structured output (the grammar "
                                                        "ends the output with EOS); drop one of them")
        if self.stop and not self.detokenize:
            raise InvalidRequestError("stop", "stop strings need detokenize=True; drop one of them")
