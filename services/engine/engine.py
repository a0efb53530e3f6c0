"""The engine: validate and queue requests; each step is schedule → execute → update."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from services.engine.blocks import cdiv
from services.engine.config import EngineConfig
from services.engine.grammar import check_structured
from services.engine.device import plan_num_blocks, torch_device
from services.engine.kv_cache import KVCacheError, KVCacheManager
from services.engine.kv_compress import CompressedStore, compressed_bytes_per_block
from services.engine.loader import LoadedModel
from services.engine.request import FinishReason, Request, RequestStatus
from services.engine.runner import ModelRunner
from services.engine.sampling_params import InvalidRequestError, SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from services.roles import Role


@dataclass
class RequestOutput:
    """What one step produced for one request.

    The `new_*` fields are this step's deltas. The cumulative fields (token_ids, text, logprobs,
    top_logprobs) are filled only on the final output (finished=True): copying whole histories
    every step would cost O(n^2) over a long generation.
    """
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    new_logprobs: list[float] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)   # when logprobs=n > 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)              # chosen-token logprobs
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None     # time.monotonic() of its first chunk (None: not run yet)


@dataclass(frozen=True)
class MigrationSnapshot:
    """A live request as a migration stage sees it, taken between two engine steps."""
    request_id: str
    running: bool                  # holds KV being extended (False: waiting to recompute; no KV to copy)
    paused: bool
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    output_logprobs: list[float]
    params: SamplingParams
    priority: int
    num_computed_tokens: int       # KV positions [0, n) are written
    block_table: list[int]         # physical ids of its logical blocks, in order
    num_preemptions: int           # changes when it lost its blocks (the copy so far is void)


def validate_prompt(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int,
                    max_model_len: int, max_tokens_limit: int | None = None, *, ints: bool = False,
                    tokenizer: Tokenizer | None = None) -> None:
    """The checks any component can make without a KV pool (the router makes them too).

    tokenizer: the model's; with it a structured-output constraint is also checked to accept some
    output (grammar.check_structured), without it only compiled.

    ints=True: the ids are known to be ints (a protobuf repeated int32), so their range is checked
    with min() and max() instead of one Python-level test per id.
    Raises InvalidRequestError naming the field a user must fix.
    """
    params.validate(vocab_size, max_tokens_limit)
    if params.structured_output is not None:
        check_structured(params.structured_output, tokenizer, vocab_size)
    if not prompt_token_ids:
        raise InvalidRequestError("prompt", "is empty; send at least one token or character")
    bad = None
    if not ints or min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("token_ids", f"id {bad!r} is outside the vocabulary [0, {vocab_size})")
    if len(prompt_token_ids) >= max_model_len:
        raise InvalidRequestError(
            "prompt", f"has {len(prompt_token_ids)} tokens but the context holds {max_model_len} "
            f"(prompt + output); shorten it to at most {max_model_len - 1} tokens")


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, tokenizer: Tokenizer):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config, self.tokenizer = config, tokenizer
        num_blocks = plan_num_blocks(config, torch_device(config.device))
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        m = config.model
        store = CompressedStore(int(config.scheduler.kv_compress_fraction * num_blocks * config.kv_bytes_per_block()),
                                compressed_bytes_per_block(m.num_layers, config.cache.block_size, m.num_kv_heads,
                                                           m.head_dim))
        self.scheduler = Scheduler(config.scheduler, self.kv, config.max_model_len, m.num_layers, store)
        self.role = config.scheduler.role      # what new work it takes; set_role changes it at run time
        self.runner = ModelRunner(config, loaded, num_blocks, self.kv.block_table, tokenizer)
        if config.scheduler.preemption_mode == "auto":
            self.scheduler.preemption.calibrate(self.runner.time_kv_copy)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._cached: dict[str, int] = {}
        self._ids = itertools.count()
        # Called after each model layer of a step that has prefill chunks: (prefill_chunks, layer_index).
        self.on_prefill_layer = None
        # on_forked(requests), when set, runs on the engine thread once the followers of this step's
        # prompts (ScheduledChunk.followers) hold their KV: a prefill instance pushes it whole from there.
        self.on_forked = None
        self.last_step_prefill_tokens = 0     # what the last step computed (for rate estimates)
        self.last_step_decodes = 0

    # ---- requests ---------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, *, ints: bool = False) -> None:
        """Raise InvalidRequestError naming the field a user must fix; no-op for a valid request.
        ints: as in validate_prompt."""
        c = self.config
        validate_prompt(prompt_token_ids, params, c.model.vocab_size, c.max_model_len, c.max_tokens_limit,
                        ints=ints, tokenizer=self.tokenizer)
        needed_blocks = cdiv(min(len(prompt_token_ids) + params.max_tokens, c.max_model_len), self.kv.block_size)
        if needed_blocks > self.kv.num_blocks:
            raise InvalidRequestError(
                "max_tokens", f"prompt + max_tokens needs {needed_blocks} KV blocks but this instance "
                f"has {self.kv.num_blocks}; lower max_tokens or shorten the prompt")

    def validate_new_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """validate() plus what only a fresh prompt needs: an instance that computes prompts."""
        if self.role == Role.DECODE:
            raise InvalidRequestError("prompt", "this instance is decode-only: send prompts to a prefill or "
                                      "colocated instance, or hand KV over with import_request")
        self.validate(prompt_token_ids, params)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, priority: int = 0, validated: bool = False,
                    handoff: bool | None = None, predicted_output_tokens: int = 0) -> str:
        """Validate and queue. Raises InvalidRequestError (bad input) or ValueError (duplicate id).

        handoff: the request leaves after its first token with HANDOFF, its KV kept for a transfer
        (None: as the instance's role says: prefill instances hand off, others decode on).
        predicted_output_tokens: the router's prediction, which the sjf policy orders by (0: unknown).
        """
        if not validated:          # validated=True: the caller did (EngineThread.submit)
            self.validate_new_request(prompt_token_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, list(prompt_token_ids), params,
                          eos_token_ids=self.config.model.eos_token_ids, priority=priority,
                          handoff=self.role == Role.PREFILL if handoff is None else handoff,
                          predicted_output_tokens=max(0, predicted_output_tokens))
        self.scheduler.add(request)
        if params.detokenize:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop)
        return request_id

    # ---- KV handoff between a prefill-role and a decode-role engine -------------------------
    def export_kv(self, request_id: str) -> torch.Tensor:
        """A copy of a handed-off request's KV: [num_blocks, layers, 2, block_size, kv_heads, head_dim].

        Precondition: the request finished with HANDOFF (prefill role) and was not released yet.
        Raises KeyError for an unknown request.
        """
        table = self.kv.block_table(request_id)
        if not table:
            raise KeyError(f"request {request_id!r} holds no KV blocks on this instance")
        return self.runner.kv[torch.tensor(table, device=self.runner.device)]

    def release(self, request_id: str) -> None:
        """Free a handed-off request's blocks (after the transfer). Safe no-op if not held."""
        if request_id not in self.scheduler.requests:
            self.kv.free(request_id)

    def reserve(self, request_id: str, num_tokens: int) -> list[int]:
        """Allocate blocks for positions [0, num_tokens) of a request whose KV will arrive from
        another instance. Returns the block ids, in logical order.

        Raises ValueError when the id is in use and RuntimeError when blocks are short (nothing is
        kept then). The blocks stay reserved until adopt() or release().
        """
        if request_id in self.scheduler.requests or self.kv.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use on this instance; use a unique id")
        needed = self.kv.blocks_needed(request_id, num_tokens)
        if self.kv.allocate(request_id, [], num_tokens) is None:
            self.kv.free(request_id)
            raise RuntimeError(f"not enough free KV blocks for {request_id!r}: {needed} needed, "
                               f"{self.kv.num_free_blocks} free")
        return list(self.kv.block_table(request_id))

    def adopt(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
              params: SamplingParams, priority: int = 0, output_logprobs: list[float] | None = None,
              recompute: bool = False) -> None:
        """Start decoding a reserved request whose blocks now hold positions
        [0, len(prompt) + len(output) - 1). It decodes from the next step. With recompute=True no
        KV came along (a request that was waiting on its old instance): any reservation is freed
        and the request queues to recompute prompt + output, like a preempted one.

        On any error the reservation is freed (never keep blocks for a request not adopted).
        """
        try:
            if not output_token_ids:
                raise InvalidRequestError("output_token_ids", "an adopted request needs its first token")
            if recompute:
                self.kv.free(request_id)
                request = Request(request_id, list(prompt_token_ids), params,
                                  eos_token_ids=self.config.model.eos_token_ids, priority=priority,
                                  output_token_ids=list(output_token_ids),
                                  output_logprobs=list(output_logprobs or [float("nan")] * len(output_token_ids)))
                request.status = RequestStatus.PREEMPTED
                self.scheduler.add(request)
                self._start_detok(request, params)
                return
            n_computed = len(prompt_token_ids) + len(output_token_ids) - 1
            have = len(self.kv.block_table(request_id)) if self.kv.has_request(request_id) else 0
            if have * self.kv.block_size < n_computed:
                raise RuntimeError(f"request {request_id!r} holds {have} blocks, too few for {n_computed} tokens")
            request = Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.config.model.eos_token_ids,
                              priority=priority, output_token_ids=list(output_token_ids),
                              output_logprobs=list(output_logprobs or [float("nan")] * len(output_token_ids)),
                              num_computed_tokens=n_computed)
            self.scheduler.add_running(request)
        except BaseException:
            if request_id not in self.scheduler.requests:
                self.kv.free(request_id)
            raise
        self._start_detok(request, params)

    def _start_detok(self, request: Request, params: SamplingParams) -> None:
        """A detokenizer that has seen the request's output so far (its text was emitted elsewhere)."""
        if params.detokenize:
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop)
            for t in request.output_token_ids:
                detok.push(t)
            self._detok[request.request_id] = detok

    def import_request(self, prompt_token_ids: list[int], output_token_ids: list[int],
                       params: SamplingParams, kv_blocks: torch.Tensor, request_id: str,
                       priority: int = 0) -> str:
        """Adopt a request whose prompt was computed elsewhere, copying its KV in one go.

        kv_blocks: [n, layers, 2, block_size, kv_heads, head_dim] holding positions
        [0, len(prompt_token_ids)) (what export_kv returns; any device and dtype: it is copied
        over). output_token_ids: tokens already sampled (at least the first). Raises
        InvalidRequestError for bad input and RuntimeError when blocks are short (nothing is kept then).
        """
        self.validate(prompt_token_ids, params)
        if not output_token_ids:
            raise InvalidRequestError("output_token_ids", "an imported request needs its first token")
        n_computed = len(prompt_token_ids) + len(output_token_ids) - 1
        needed = cdiv(n_computed, self.kv.block_size)
        expected = (needed,) + tuple(self.runner.kv.shape[1:])
        if tuple(kv_blocks.shape) != expected:
            raise InvalidRequestError("kv_blocks", f"shape {tuple(kv_blocks.shape)} does not match this "
                                      f"instance's layout {expected}; both sides must share model and block size")
        table = self.reserve(request_id, n_computed)
        try:
            kv = self.runner.kv
            kv[torch.tensor(table, device=kv.device)] = kv_blocks.to(device=kv.device, dtype=kv.dtype)
        except BaseException:
            self.kv.free(request_id)
            raise
        self.adopt(request_id, prompt_token_ids, output_token_ids, params, priority)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request now and free its blocks. Safe no-op for unknown or finished ids."""
        request = self.scheduler.finish(request_id, FinishReason.ABORT)
        return None if request is None else self._output(request, 0, "")

    def set_role(self, role: Role, mixed_prefill_tokens: int | None = None) -> None:
        """Change what new work this engine takes; requests it holds run on unchanged (a prefill
        still hands off, a decode keeps decoding). mixed_prefill_tokens, when given, becomes the
        cap on prompt tokens per step beside decodes (0: none)."""
        self.role = role
        if mixed_prefill_tokens is not None:
            if mixed_prefill_tokens < 0:
                raise ValueError(f"mixed_prefill_tokens must be >= 0, got {mixed_prefill_tokens}")
            self.scheduler.mixed_prefill_tokens = mixed_prefill_tokens

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def has_schedulable(self) -> bool:
        """True when a step could do work (paused requests wait for their migration, not a step)."""
        return bool(self.scheduler.running or self.scheduler.waiting)

    # ---- live migration (source side: snapshot, pause, resume, hand off) ----------------------
    def migration_snapshot(self, request_id: str) -> "MigrationSnapshot | None":
        """What a migration stage needs to know about a live request now; None if it is not here."""
        r = self.scheduler.requests.get(request_id)
        if r is None:
            return None
        status = self.scheduler.paused[request_id][1] if request_id in self.scheduler.paused else r.status
        return MigrationSnapshot(
            request_id, status == RequestStatus.RUNNING, r.status == RequestStatus.PAUSED, list(r.prompt_token_ids),
            list(r.output_token_ids), list(r.output_logprobs), r.sampling_params, r.priority,
            r.num_computed_tokens, self.kv.block_table(request_id), r.num_preemptions)

    def pause(self, request_id: str) -> "MigrationSnapshot | None":
        """Stop scheduling a live request (it keeps its blocks) and return its snapshot."""
        if self.scheduler.pause(request_id) is None:
            return None
        return self.migration_snapshot(request_id)

    def resume(self, request_id: str) -> bool:
        """Schedule a paused request again (its migration did not commit)."""
        return self.scheduler.resume(request_id)

    def hand_off(self, request_id: str) -> RequestOutput | None:
        """Finish a paused request that now lives elsewhere: free its blocks here and return its
        final output (finish_reason HANDOFF; text a stop string or split character still holds
        back is not flushed: the new owner emits it). None if it is not paused here."""
        if request_id not in self.scheduler.paused:
            return None
        request = self.scheduler.finish(request_id, FinishReason.HANDOFF)
        self.kv.free(request_id)
        return self._output(request, 0, "")

    def extend_reservation(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow a reservation (from reserve()) to cover positions [0, num_tokens); returns the
        whole block table. RuntimeError when blocks are short (the reservation is unchanged)."""
        if request_id in self.scheduler.requests or not self.kv.has_request(request_id):
            raise ValueError(f"request {request_id!r} holds no reservation on this instance")
        needed = self.kv.blocks_needed(request_id, num_tokens)
        if self.kv.allocate(request_id, [], num_tokens) is None:
            raise RuntimeError(f"not enough free KV blocks for {request_id!r}: {needed} more needed, "
                               f"{self.kv.num_free_blocks} free")
        return self.kv.block_table(request_id)

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_step_prefill_tokens = sum(c.cost for c in out.prefills)
        self.last_step_decodes = len(out.decodes)
        self.runner.move_kv(out, self.scheduler.kv_store, self.scheduler.preemption)   # before anything overwrites
        if out.is_empty:
            return []
        now = time.monotonic()
        for chunk in out.prefills:
            self._cached.setdefault(chunk.request.request_id, chunk.request.num_computed_tokens)
            for r in [chunk.request, *chunk.followers]:
                if r.first_scheduled_time is None:
                    r.first_scheduled_time = now
            for f in chunk.followers:             # a follower computes none of its prompt
                self._cached[f.request_id] = f.num_prompt_tokens
        hook = self.on_prefill_layer
        on_layer = (lambda i: hook(out.prefills, i)) if hook is not None and out.prefills else None
        costs = self.scheduler.preemption
        t0 = time.perf_counter()
        chunks, samples = self.runner.execute(out, on_layer)
        if costs.mode == "auto":            # what a recompute would cost: only auto compares
            costs.rates.observe(time.perf_counter() - t0, self.last_step_prefill_tokens, self.last_step_decodes)
        sampled = {}
        if samples is not None:
            for i, chunk in enumerate(chunks):
                sampled[chunk.request.request_id] = samples.token_ids[i]
        finished = {r.request_id for r in self.scheduler.update(out, sampled)}
        if samples is not None:             # logprobs of the tokens update() appended (not a refused follower's)
            for i, chunk in enumerate(chunks):
                r = chunk.request
                if r.status != RequestStatus.WAITING:
                    r.output_logprobs.append(samples.logprobs[i])
                    if samples.top_logprobs[i] is not None:
                        r.output_top_logprobs.append(samples.top_logprobs[i])
        self.runner.copy_blocks(out.block_copies)
        if self.on_forked is not None:
            forked = [f for c in out.prefills for f in c.followers if f.status != RequestStatus.WAITING]
            if forked:
                self.on_forked(forked)
        outputs = []
        for chunk in chunks:
            r = chunk.request
            if r.status == RequestStatus.WAITING:  # a follower that found no blocks: it runs later, unsampled
                self._cached.pop(r.request_id, None)
                continue
            detok = self._detok.get(r.request_id)
            delta = detok.push(r.output_token_ids[-1]) if detok else ""
            if detok and detok.stopped:      # a stop string wins over LENGTH on the same token
                if r.request_id in finished:
                    r.finish_reason = FinishReason.STOP
                else:
                    self.scheduler.finish(r.request_id, FinishReason.STOP)
                    finished.add(r.request_id)
            outputs.append(self._output(r, 1, delta))
        return outputs

    def _output(self, r: Request, num_new: int, delta: str) -> RequestOutput:
        n = len(r.output_token_ids)
        out = RequestOutput(r.request_id, r.output_token_ids[n - num_new:], delta, r.is_finished,
                            r.finish_reason, r.output_logprobs[n - num_new:] if num_new else [],
                            num_prompt_tokens=r.num_prompt_tokens, first_scheduled_time=r.first_scheduled_time)
        k = len(r.output_top_logprobs)     # tokens adopted from elsewhere have none here: align on the tail
        if num_new and r.sampling_params.logprobs and k >= num_new:
            out.new_top_logprobs = r.output_top_logprobs[k - num_new:]
        if not r.is_finished:
            return out
        self.runner.adjuster.release(r.request_id)
        if self.runner.grammar is not None:
            self.runner.grammar.release(r.request_id)
        detok = self._detok.pop(r.request_id, None)
        if detok and r.finish_reason != FinishReason.HANDOFF:    # on a hand-off the new owner emits it
            out.new_text += detok.flush()     # text held back for a possible stop string or split character
        out.token_ids, out.text = list(r.output_token_ids), detok.text if detok else ""
        out.logprobs, out.top_logprobs = list(r.output_logprobs), list(r.output_top_logprobs)
        out.num_cached_tokens = self._cached.pop(r.request_id, 0)
        out.first_scheduled_time = r.first_scheduled_time
        return out

    # ---- offline convenience -------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run every prompt to completion; results in input order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]

    def check_integrity(self) -> None:
        """KV block accounting, and every compressed copy belonging to a request waiting here
        (or paused while waiting: a migration's stop phase)."""
        self.kv.check_integrity()
        store, sched = self.scheduler.kv_store, self.scheduler
        waiting = {r.request_id for r in sched.waiting} | set(sched.paused)
        stray = [rid for rid in store.ids() if rid not in waiting]
        if stray:
            raise KVCacheError(f"compressed KV held for requests not waiting here: {stray[:5]}")
        if store.bytes_used != sum(store.entry_bytes(rid) for rid in store.ids()):
            raise KVCacheError(f"compressed store counts {store.bytes_used} bytes, its entries hold another sum")
