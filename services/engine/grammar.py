"""Structured output with llguidance: constraints compiled to grammars, checked at the edge, and
enforced in the sampler as a per-row token mask.

Library: llguidance (MIT, Microsoft; Rust core with Python bindings). Chosen over xgrammar and
outlines-core because it needs no ahead-of-time vocabulary pass per grammar (a JSON-schema matcher
is built in about a millisecond on a 49k vocabulary, masks take tens of microseconds a row on the
CPU), it reports unsatisfiable schemas as errors, and it is what vLLM's `guidance` backend uses.

Compile and check (router and worker, the same function):

    check_structured(so, tokenizer)  raises InvalidRequestError("structured_output", why) for a
                                     schema that is not JSON, a schema/regex/grammar llguidance
                                     rejects (unsatisfiable included) and, given the tokenizer,
                                     a grammar whose language is empty as far as the first step
                                     shows (its first mask allows nothing). A grammar that can
                                     always extend but never end (`start: "a" start`) is not found:
                                     it runs to max_tokens (finish_reason length)

Enforcement (GrammarMasker, one per runner, on the engine thread):

    masker.begin(requests)   before the forward pass: for the constrained rows, each row's matcher
                             is advanced over the output tokens it has not seen (normally the one
                             sampled last step) and fills the next-token bitmask, either on a
                             helper thread while the model runs (overlap) or in apply, on every
                             core the forward pass used (inline); `mode` says which (see
                             GrammarMasker); None when no row is constrained
    pending.apply(x)         in the sampler, after the other adjustments: waits for the helper,
                             sets disallowed tokens to -inf; a row whose grammar is complete and
                             cannot go on (or broke) gets EOS only
    masker.release(id)       when the request finishes here (safe no-op otherwise)

A row's matcher is built from the grammar and the request's output tokens, which travel with the
request: an instance that adopts it after a KV handoff or a migration, or recomputes it after a
preemption, rebuilds the same state by consuming the output so far (the prompt plays no part).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import llguidance
import torch
from llguidance import LLExecutor, LLMatcher, LLParserLimits, LLTokenizer

from services.engine import fused_ops
from services.engine.mask_mode import MaskModeChooser
from services.engine.request import Request
from services.engine.sampling_params import InvalidRequestError, StructuredKind, StructuredOutput
from services.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LIBRARY = "llguidance"
LIBRARY_VERSION = getattr(llguidance, "__version__", None) or __import__("importlib.metadata").metadata.version(
    "llguidance")
FIELD = "structured_output"
# JSON as models write it: ", " and ": " between items, no other whitespace (free whitespace lets a
# small model pad forever with newlines).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LIMITS = LLParserLimits(verbose_errors=False)      # errors name the problem, not the parser's state
_MAX_MESSAGE = 300


def _message(error: str) -> str:
    """llguidance's error, first line, bounded (a user's 400 must not carry a state dump)."""
    first = error.strip().splitlines()[0] if error.strip() else "rejected by the grammar compiler"
    return first if len(first) <= _MAX_MESSAGE else first[:_MAX_MESSAGE] + "..."


@functools.lru_cache(maxsize=256)
def grammar_of(so: StructuredOutput) -> str:
    """The llguidance grammar of a constraint. Raises InvalidRequestError naming structured_output."""
    so.validate()
    if so.kind == StructuredKind.JSON_OBJECT:
        grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    elif so.kind == StructuredKind.JSON_SCHEMA:
        try:
            schema = json.loads(so.spec)
        except ValueError as e:
            raise InvalidRequestError(FIELD, f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(FIELD, f"a JSON schema must be an object (or a boolean), got "
                                             f"{type(schema).__name__}")
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(FIELD, f"invalid JSON schema: {_message(str(e))}") from None
    elif so.kind == StructuredKind.REGEX:
        grammar = LLMatcher.grammar_from_regex(so.spec)
    elif so.kind == StructuredKind.CHOICE:
        # Lark string literals take JSON's escapes: each choice is matched literally.
        grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choices))
    else:
        grammar = LLMatcher.grammar_from_lark(so.spec)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_LIMITS)
    if is_error:
        what = {StructuredKind.JSON_SCHEMA: "invalid JSON schema", StructuredKind.REGEX: "invalid regex",
                StructuredKind.GRAMMAR: "invalid grammar"}.get(so.kind, "invalid constraint")
        raise InvalidRequestError(FIELD, f"{what}: {_message(messages[0] if messages else '')}")
    return grammar


_tokenizer_lock = threading.Lock()


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> LLTokenizer:
    """llguidance's view of `tokenizer` (built once per Tokenizer object and vocab size: ~0.2 s on a
    49k vocabulary); `vocab_size` is the model's (masks are that wide)."""
    key = ("_llguidance", vocab_size)
    with _tokenizer_lock:
        cache = tokenizer.__dict__.setdefault("_llguidance_by_vocab", {})
        ll = cache.get(key)
        if ll is None:
            eos = list(tokenizer.eos_token_ids) or None
            ll = cache[key] = LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        return ll


@functools.lru_cache(maxsize=1024)
def _checked(so: StructuredOutput, ll: LLTokenizer) -> None:
    matcher = LLMatcher(ll, grammar_of(so), log_level=0, limits=_LIMITS)
    if not matcher.is_error():
        matcher.compute_bitmask()            # the first step finds an empty language
    if matcher.is_error():
        raise InvalidRequestError(FIELD, f"the constraint accepts no output: {_message(matcher.get_error())}")


def check_structured(so: StructuredOutput, tokenizer: Tokenizer | None = None, vocab_size: int | None = None) -> None:
    """Raise InvalidRequestError("structured_output", ...) for a constraint that cannot be enforced;
    a no-op for a good one (results are cached: a repeated schema costs a dictionary look-up).
    Without a tokenizer only the grammar is compiled (an empty language is found at the first step)."""
    grammar_of(so)
    if tokenizer is not None:
        _checked(so, ll_tokenizer(tokenizer, vocab_size or tokenizer.vocab_size))


@dataclass
class _State:
    request: Request
    matcher: LLMatcher
    num_consumed: int = 0          # output tokens the matcher has consumed
    broken: bool = False           # an output token the grammar refused (not sampled under this mask)


class PendingMask:
    """The mask of one step, being computed: `rows` (batch rows it constrains, ascending) and `apply`."""

    def __init__(self, masker: "GrammarMasker", rows: list[int], future: Future | None, requests: list[Request],
                 overlap: bool):
        self.rows, self._masker, self._future, self._requests = rows, masker, future, requests
        self.overlap, self._started = overlap, time.perf_counter()
        self._result: tuple[torch.Tensor, list[int]] | None = None

    def wait(self) -> tuple[torch.Tensor, list[int]]:
        """(bitmask [len(rows), ceil(V/32)] int32, positions in rows whose grammar allows only EOS)."""
        if self._result is None:
            t0 = time.perf_counter()
            self._result = self._future.result() if self._future is not None else \
                self._masker._compute(self._requests, self._masker.inline_threads)
            self._masker.stats.wait_s += time.perf_counter() - t0
        return self._result

    def apply(self, x: torch.Tensor) -> None:
        """x: [len(rows), V] float32 logits of `rows` (after the other adjustments): changed in place."""
        bits, eos_only = self.wait()
        self._masker.mask_logits(x, bits, eos_only)
        self._masker._applied(self.overlap, time.perf_counter() - self._started)


@dataclass
class MaskStats:
    """Cumulative: steps with constrained rows (and how many of them overlapped), rows masked,
    seconds computing masks (helper thread or inline) and seconds the engine thread waited for them
    (what the overlap did not hide)."""
    steps: int = 0
    overlapped_steps: int = 0
    rows: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0


MASK_MODES = ("overlap", "inline", "measured")


class GrammarMasker:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, device: torch.device, mode: str | None = None):
        """mode: "overlap" (a helper thread computes masks while the forward pass runs), "inline" (the
        sampler computes them after it, with llguidance on `inline_threads` workers: every core the
        forward pass used) or "measured" (both alternately on the live batch, the faster kept and
        re-measured now and then: services/engine/mask_mode.py). None: overlap where a core is free
        for the helper (a GPU model, or torch on fewer threads than the host has cores), measured
        otherwise: which of the two wins on a CPU whose cores all run the model depends on the host."""
        if mode is None:
            spare_core = device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
            mode = "overlap" if spare_core else "measured"
        if mode not in MASK_MODES:
            raise ValueError(f"mask mode {mode!r}: choose from {list(MASK_MODES)}")
        self.tokenizer, self.vocab_size, self.device = tokenizer, vocab_size, device
        self.mode = mode
        self.chooser = MaskModeChooser()
        self.inline_threads = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
        self._states: dict[str, _State] = {}
        self._executors: dict[int, LLExecutor] = {}      # by worker count: 1 on the helper, inline_threads inline
        self._helper: ThreadPoolExecutor | None = None
        self._bitmask = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)
        self._eos = list(tokenizer.eos_token_ids)
        self.stats = MaskStats()

    @property
    def num_states_held(self) -> int:
        return len(self._states)

    def begin(self, requests: Sequence[Request]) -> PendingMask | None:
        """Start the mask of the sampled rows `requests` (row order); None if none is constrained.
        Call before the forward pass; the result's apply() (or wait()) must run before the next begin."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.structured_output is not None]
        if not rows:
            return None
        chosen = [requests[i] for i in rows]
        overlap = self.mode == "overlap" or (self.mode == "measured" and self.chooser.overlap())
        future = None
        if overlap:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
            future = self._helper.submit(self._compute, chosen, 1)
            self.stats.overlapped_steps += 1
        return PendingMask(self, rows, future, chosen, overlap)

    def _applied(self, overlap: bool, seconds: float) -> None:
        """A step's mask was applied `seconds` after begin(): what the measured mode compares."""
        if self.mode == "measured":
            self.chooser.record(overlap, seconds)

    def release(self, request_id: str) -> None:
        """Drop a request's grammar state. Safe no-op for an unknown id."""
        self._states.pop(request_id, None)

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None

    # ---- the step ---------------------------------------------------------------------------
    def _compute(self, requests: list[Request], threads: int) -> tuple[torch.Tensor, list[int]]:
        t0 = time.perf_counter()
        try:
            return self._compute_masks(requests, threads)
        finally:
            self.stats.steps += 1
            self.stats.rows += len(requests)
            self.stats.compute_s += time.perf_counter() - t0

    def _compute_masks(self, requests: list[Request], threads: int) -> tuple[torch.Tensor, list[int]]:
        n = len(requests)
        if self._bitmask.shape[0] < n:
            self._bitmask = torch.empty(max(n, 2 * self._bitmask.shape[0]), self._bitmask.shape[1], dtype=torch.int32)
        bits = self._bitmask[:n]
        states = [self._sync(r) for r in requests]
        eos_only = [j for j, s in enumerate(states) if s.broken or s.matcher.is_stopped()]
        skip = set(eos_only)
        live = [(s.matcher, j) for j, s in enumerate(states) if j not in skip]
        if live:
            executor = self._executors.get(threads)
            if executor is None:
                executor = self._executors[threads] = LLExecutor(num_threads=threads)
            executor.unsafe_compute_mask_ptr(live, bits.data_ptr(), bits.shape[1] * 4, n)
        return bits.clone(), eos_only

    def _sync(self, r: Request) -> _State:
        """r's matcher, made on first use, advanced over the output tokens it has not consumed."""
        state = self._states.get(r.request_id)
        if state is None or state.request is not r:
            ll = ll_tokenizer(self.tokenizer, self.vocab_size)
            matcher = LLMatcher(ll, grammar_of(r.sampling_params.structured_output), log_level=0, limits=_LIMITS)
            state = self._states[r.request_id] = _State(r, matcher)
        new = r.output_token_ids[state.num_consumed:]
        if new and not state.broken:
            if not state.matcher.consume_tokens(list(new)):
                state.broken = True
                log.warning("request %s: output token refused by its grammar (%s); only EOS is allowed now",
                            r.request_id, _message(state.matcher.get_error()))
        state.num_consumed = len(r.output_token_ids)
        return state

    def mask_logits(self, x: torch.Tensor, bits: torch.Tensor, eos_only: list[int]) -> None:
        """x [n, V] float32: entries whose bit is 0 in bits [n, ceil(V/32)] int32 become -inf; rows
        eos_only keep only the first EOS id."""
        fused_ops.mask_tokens_(x, bits)
        if eos_only:
            rows = torch.tensor(eos_only, device=x.device)
            x[rows] = float("-inf")
            if self._eos:
                x[rows, self._eos[0]] = 0.0
