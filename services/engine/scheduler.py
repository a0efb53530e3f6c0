"""Continuous batching with chunked (or layered) prefill under a per-step token budget.

Every request is two counters: num_computed_tokens chases num_tokens (prompt + output). A step
gives each scheduled request some of the tokens it lacks: one for a decode, a chunk for a
prefill, the whole prompt + output again after preemption. Running requests are served first,
then waiting ones are admitted while budget and blocks last. When blocks run out, the policy's
victim is preempted: its blocks are freed and it will recompute, or (preemption_mode compress /
auto, services/engine/preemption.py) its KV is copied out in int8 first and copied back into new
blocks when it is admitted again (KvSave / KvRestore, which the runner applies before the step's
forward). Under sjf, a much shorter waiting request may also take a full batch's slot from the
running request with the most work left (displacement, queue_order.displaces), preempted the same
way. The scheduler never touches tensors; it deals in request ids, counts and (through
KVCacheManager) block ids.

Layered prefill (mixed_prefill_mode "layered", beside running decodes only): instead of a chunk of
its tokens through every layer, a prompt sends all its uncomputed tokens through a group of layers
per step (LayerGroup), sized so tokens x group / num_layers stays within the step's prefill cap:
the same compute per step as a chunk, but every weight is read once for decodes and prompt alike,
and no chunk re-reads the prompt's earlier KV. Its counters move only when the last group is done
(then its last row is sampled); in between the request carries its residual stream
(Request.layer_hidden). At most one prompt is layered per step, and its rows come last.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from services.engine.blocks import cdiv
from services.engine.config import MIXED_PREFILL_MODES, SchedulerConfig
from services.engine.kv_cache import KVCacheManager
from services.engine.kv_compress import CompressedKV, CompressedStore
from services.engine.preemption import COMPRESS, RECOMPUTE, PreemptionCosts
from services.engine.policy import make_policy
from services.engine.request import FinishReason, Request, RequestStatus

log = logging.getLogger("tandem.engine")

@dataclass(frozen=True)
class LayerGroup:
    """Layers [first, end) of num_layers that a layered chunk's tokens go through this step."""
    first: int
    end: int
    num_layers: int

    @property
    def last(self) -> bool:
        return self.end == self.num_layers


@dataclass
class ScheduledChunk:
    request: Request
    num_new_tokens: int              # compute positions [num_computed_tokens, + num_new_tokens)
    # Twins of this chunk's prompt (the n choices of one request) that need no computation: when the
    # chunk completes the prompt, each is sampled from the same logits row with its own parameters
    # and takes a copy of the prompt's KV (the cached full blocks shared, the last block copied).
    followers: list[Request] = field(default_factory=list)
    layers: LayerGroup | None = None     # a layered chunk: only these layers this step (None: all)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens (and of the layers), so its last
        row is sampled."""
        return (self.layers is None or self.layers.last) and \
            self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens

    @property
    def cost(self) -> int:
        """Tokens of compute this step, in whole-model token equivalents (a layered chunk: its
        tokens x its share of the layers, rounded up)."""
        if self.layers is None:
            return self.num_new_tokens
        return math.ceil(self.num_new_tokens * (self.layers.end - self.layers.first) / self.layers.num_layers)


@dataclass(frozen=True)
class KvSave:
    """Copy request_id's first blocks (block_ids, still intact until this step's forward) into its
    reserved CompressedStore entry."""
    request_id: str
    block_ids: list[int]


@dataclass(frozen=True)
class KvRestore:
    """Dequantize `data`'s blocks skip, skip+1, ... into block_ids (new blocks of request_id)."""
    request_id: str
    data: CompressedKV
    block_ids: list[int]
    skip: int


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledChunk] = field(default_factory=list)    # one token each
    prefills: list[ScheduledChunk] = field(default_factory=list)   # prompt (or recompute) chunks
    preempted: list[str] = field(default_factory=list)
    # (source block, destination block) KV copies update() decided (followers' last blocks): the
    # engine applies them right after update(), before anything reads the destinations.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # KV copies for compressed preemption, applied before the forward (saves first, then restores).
    kv_saves: list[KvSave] = field(default_factory=list)
    kv_restores: list[KvRestore] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_new_tokens for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, num_layers: int = 0,
                 kv_store: CompressedStore | None = None):
        """num_layers: the model's (0, unknown: prompts are never layered, only chunked). kv_store:
        where compressed preemption keeps copies (None: an empty budget, so every victim
        recomputes). ValueError on an unknown mixed_prefill_mode or preemption_mode."""
        if config.mixed_prefill_mode not in MIXED_PREFILL_MODES:
            raise ValueError(f"mixed_prefill_mode must be one of {', '.join(MIXED_PREFILL_MODES)}, "
                             f"got {config.mixed_prefill_mode!r}")
        self.config, self.kv, self.max_model_len, self.num_layers = config, kv, max_model_len, num_layers
        self.policy = make_policy(config.policy, config.aging_s, config.displace_ratio)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.paused: dict[str, tuple[Request, RequestStatus]] = {}   # id → (request, status to resume to)
        self.requests: dict[str, Request] = {}
        self.mixed_prefill_tokens = config.mixed_prefill_tokens   # see SchedulerConfig; set at run time too
        self.preemption = PreemptionCosts(config.preemption_mode)
        self.kv_store = kv_store if kv_store is not None else CompressedStore(0, 1)

    # ---- queue management -------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a validated request. Raises ValueError on a duplicate live request id."""
        if request.request_id in self.requests or self.kv.has_request(request.request_id):
            raise ValueError(f"request_id {request.request_id!r} is already in use; use a unique id")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Adopt a request whose blocks are already allocated and filled up to
        request.num_computed_tokens (KV imported from another instance): it decodes next step."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use; use a unique id")
        if not self.kv.has_request(request.request_id):
            raise ValueError(f"request {request.request_id!r} has no blocks; allocate them before adopting it")
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        self.running.append(request)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish a live request and free its blocks. Safe no-op for an unknown/finished id.

        HANDOFF keeps the blocks: the KV is about to be copied to another instance, and the
        owner frees them with kv.free(request_id) once the copy is done (or abandoned).
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.request_id in self.paused:
            del self.paused[request.request_id]
        elif request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if reason != FinishReason.HANDOFF:
            self.kv.free(request_id)
        self.kv_store.drop(request_id)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
        return request

    def pause(self, request_id: str) -> Request | None:
        """Take a live request out of scheduling, keeping its blocks and counters (the stop phase of
        a migration). None for an unknown, finished or already paused id."""
        request = self.requests.get(request_id)
        if request is None or request_id in self.paused:
            return None
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.paused[request_id] = (request, request.status)
        request.status = RequestStatus.PAUSED
        return request

    def resume(self, request_id: str) -> bool:
        """Put a paused request back where it was (a migration that did not commit)."""
        entry = self.paused.pop(request_id, None)
        if entry is None:
            return False
        request, status = entry
        request.status = status
        (self.running if status == RequestStatus.RUNNING else self.waiting).append(request)
        return True

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        displaced = self._displace_for_shorter(out)
        # Decodes first under every policy (one token each keeps TPOT steady), then prefill chunks.
        for request in sorted(self.running, key=lambda r: (not self._is_decode(r), self.policy.key(r))):
            if budget <= 0:
                break
            if request.request_id not in self.requests or request.status != RequestStatus.RUNNING:
                continue       # preempted earlier in this loop
            decode = self._is_decode(request)
            room = budget if decode else self._prefill_budget(out, budget)
            layers = None if decode else self._layer_group(request, out, room)
            if request.layers_done and layers is None:
                continue       # part way through its layers: it waits for room, never a plain chunk
            n = request.num_tokens - request.num_computed_tokens if layers else self._tokens_wanted(request, room)
            if n <= 0:
                continue
            if not self._reserve_or_preempt(request, n, out, scheduled):
                continue       # `request` itself was preempted
            budget -= self._emit(out, request, n, layers)
            scheduled.add(request.request_id)
        if len(out.preempted) == displaced:        # no block shortage: new work may come in
            budget = self._admit_waiting(out, self._prefill_budget(out, budget))
        out.prefills.sort(key=lambda c: c.layers is not None)     # a layered chunk's rows come last
        return out

    def _displace_for_shorter(self, out: SchedulerOutput) -> int:
        """With every batch slot taken, let the policy give one slot to the waiting request first
        in its order (sjf: a much shorter one; SchedulingPolicy.displacement_victim). The victim
        is preempted as for blocks (recompute or compressed) and waits its turn. Returns 0 or 1."""
        if not self.policy.displace_ratio or len(self.running) < self.config.max_num_seqs or not self.waiting:
            return 0
        head = min(self.waiting, key=self.policy.key)       # admission_order's first, without the sort

        def keeps_kv(r: Request) -> bool:
            blocks = cdiv(r.num_computed_tokens, self.kv.block_size)
            return self.preemption.choose(r.num_computed_tokens, blocks, self.kv_store.room_for(blocks),
                                          count=False) == COMPRESS
        victim = self.policy.displacement_victim(head, [r for r in self.running if r.num_output_tokens], keeps_kv)
        if victim is None:
            return 0
        victim.num_displaced += 1
        self.preemption.displaced += 1
        self._preempt(victim, out)
        return 1

    def _prefill_budget(self, out: SchedulerOutput, budget: int) -> int:
        """Tokens prompt chunks may still take this step: all of `budget`, or beside decodes at
        most mixed_prefill_tokens in all (Sarathi-style: the decodes' step stays short)."""
        if not (self.mixed_prefill_tokens and out.decodes):
            return budget
        used = sum(c.cost for c in out.prefills)
        return min(budget, max(0, self.mixed_prefill_tokens - used))

    def _layer_group(self, request: Request, out: SchedulerOutput, room: int) -> LayerGroup | None:
        """The layers `request`'s uncomputed tokens go through this step, or None for a plain chunk.

        Layered only in that mode, beside decodes (or to finish a prompt already part way through
        its layers), for one prompt a step, never for a handoff (its KV streams out layer by layer
        to a decode instance) and not when the whole rest fits in `room` at once."""
        if self.config.mixed_prefill_mode != "layered" or not self.num_layers or request.handoff or room <= 0:
            return None
        if not (out.decodes and self.mixed_prefill_tokens) and not request.layers_done:
            return None
        if any(c.layers is not None for c in out.prefills):
            return None
        if not request.layers_done and any(r.layers_done for r in self.running if r is not request):
            return None        # another prompt is part way through its layers: it goes first
        q = request.num_tokens - request.num_computed_tokens
        if not request.layers_done and q <= room:
            return None
        group = max(1, room * self.num_layers // q) if out.decodes else self.num_layers
        return LayerGroup(request.layers_done, min(self.num_layers, request.layers_done + group), self.num_layers)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        computing = None          # keys of the prompts being computed now (see _twin_key)
        completing: dict[int, ScheduledChunk] = {}   # key → this step's chunk that completes that prompt
        for chunk in out.prefills:
            if self._may_lead(chunk):
                completing.setdefault(self._prompt_key(chunk.request), chunk)
        for request in self.policy.admission_order(self.waiting):
            if len(self.running) >= self.config.max_num_seqs:
                break
            if request.request_id in out.preempted:
                continue       # displaced this step: its KV copy is made after schedule(), it waits its turn
            key = self._twin_key(request)
            if key is not None and key in completing and \
                    request.prompt_token_ids == completing[key].request.prompt_token_ids:
                self._follow(completing[key], request)   # sampled from its twin's row, no tokens computed
                continue
            if budget <= 0 or (budget < request.num_tokens and any(c.layers for c in out.prefills)):
                break          # (one layered prompt a step: the next one waits rather than chunk beside it)
            if key is not None:
                if computing is None:
                    computing = {self._prompt_key(r) for r in self.running
                                 if r.num_computed_tokens < r.num_prompt_tokens and not r.num_output_tokens}
                if key in computing:
                    continue      # its twin computes this prompt: it follows the chunk that completes it
            cached = None
            if not self.kv.has_request(request.request_id):   # attach cached prefix blocks, if any
                cached = request.num_computed_tokens = self.kv.allocate(request.request_id, request.all_token_ids, 0) or 0
                # a compressed copy covers more than the cache: it comes back before the forward
                request.num_computed_tokens = max(cached, self.kv_store.num_tokens(request.request_id))
            layers = self._layer_group(request, out, budget)
            n = request.num_tokens - request.num_computed_tokens if layers else self._tokens_wanted(request, budget)
            if self.kv.allocate(request.request_id, request.all_token_ids,
                                request.num_computed_tokens + n) is None:
                self.kv.free(request.request_id)      # drop the prefix hits we attached
                request.num_computed_tokens = 0
                break                                  # head of line waits for blocks
            if cached is not None and request.num_computed_tokens > cached:
                self._restore(request, cached, out)
            self.waiting.remove(request)
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            budget -= self._emit(out, request, n, layers)
            if key is not None and request.num_computed_tokens < self._shareable_tokens(request):
                computing.add(key)    # it computes the shared blocks; a twin that attached them does not
            if key is not None and self._may_lead(out.prefills[-1]):
                completing.setdefault(key, out.prefills[-1])
        return budget

    def _may_lead(self, chunk: ScheduledChunk) -> bool:
        """Whether twins may follow `chunk`: it completes a prompt nothing was generated from yet.
        (A follower on a prefill instance has its whole KV pushed after the step: on_forked.)"""
        r = chunk.request
        return chunk.samples and not r.num_output_tokens and self._twin_key(r, admitted=True) is not None

    def _follow(self, chunk: ScheduledChunk, request: Request) -> None:
        """Run `request` (a waiting twin of chunk's prompt) as a follower of `chunk` this step."""
        self.waiting.remove(request)
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        chunk.followers.append(request)
        log.debug("request %s follows %s (same prompt: sampled from its row, KV copied)",
                  request.request_id, chunk.request.request_id)

    def _shareable_tokens(self, request: Request) -> int:
        """Prompt tokens a twin can attach from the cache: the full blocks before the last token."""
        return (request.num_prompt_tokens - 1) // self.kv.block_size * self.kv.block_size

    def _twin_key(self, request: Request, admitted: bool = False) -> int | None:
        """A key of the request's prompt when a twin (a request with the same prompt: the n choices
        of one prompt, a client's retry) could share its KV: prefix caching on, the prompt longer
        than one block, nothing computed or generated yet (`admitted`: a running request's key). A
        twin waits while another computes the prompt and follows the chunk that completes it (see
        ScheduledChunk.followers), so the n choices of a prompt cost one prefill. A twin that
        arrives later attaches the cached blocks and computes only the last block. None: admit as
        usual."""
        if (not self.kv.enable_prefix_caching or request.num_prompt_tokens <= self.kv.block_size
                or request.num_output_tokens or (not admitted and self.kv.has_request(request.request_id))):
            return None
        return self._prompt_key(request)

    @staticmethod
    def _prompt_key(request: Request) -> int:
        if request.prompt_key is None:
            request.prompt_key = hash(tuple(request.prompt_token_ids))
        return request.prompt_key

    def _tokens_wanted(self, request: Request, budget: int) -> int:
        n = request.num_tokens - request.num_computed_tokens
        if request.handoff and request.num_output_tokens > 0:
            return 0
        if n > 1 and self.config.long_prefill_token_threshold:
            n = min(n, self.config.long_prefill_token_threshold)
        return min(n, budget)

    def _reserve_or_preempt(self, request: Request, n: int, out: SchedulerOutput, scheduled: set[str]) -> bool:
        """Allocate slots for `request`, preempting victims (never already-scheduled ones) as needed."""
        while self.kv.allocate(request.request_id, request.all_token_ids, request.num_computed_tokens + n) is None:
            candidates = [r for r in self.running if r.request_id not in scheduled]
            victim = self.policy.preemption_victim(candidates)
            self._preempt(victim, out)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        rid = request.request_id
        tokens = 0 if request.layers_done else request.num_computed_tokens   # a layered prompt's are not all there
        blocks = cdiv(tokens, self.kv.block_size)
        mode = self.preemption.choose(tokens, blocks, self.kv_store.room_for(blocks))
        if mode == COMPRESS and self.kv_store.reserve(rid, blocks, tokens):
            out.kv_saves.append(KvSave(rid, self.kv.block_table(rid)[:blocks]))
        else:
            mode = RECOMPUTE
        self.preemption.counted(mode)
        self.kv.free(rid)
        request.status, request.num_computed_tokens = RequestStatus.PREEMPTED, 0
        request.layers_done, request.layer_hidden = 0, None
        request.num_preemptions += 1
        self.waiting.append(request)
        out.preempted.append(request.request_id)

    def _restore(self, request: Request, cached: int, out: SchedulerOutput) -> None:
        """`request` was just allocated blocks for its compressed copy's tokens (the first `cached`
        of them came from the prefix cache, exact): the runner fills the rest from the copy."""
        rid = request.request_id
        saved, data = self.kv_store.take(rid)
        skip = cached // self.kv.block_size
        table = self.kv.block_table(rid)
        out.kv_restores.append(KvRestore(rid, data, table[skip:cdiv(saved, self.kv.block_size)], skip))
        self.kv.exclude_from_prefix_cache(rid)       # lossy KV is never reused as exact
        self.preemption.restored += 1

    @staticmethod
    def _is_decode(request: Request) -> bool:
        return request.num_output_tokens > 0 and request.num_tokens - request.num_computed_tokens == 1

    @staticmethod
    def _emit(out: SchedulerOutput, request: Request, n: int, layers: LayerGroup | None = None) -> int:
        """Add the chunk; returns its cost (budget it takes)."""
        chunk = ScheduledChunk(request, n, layers=layers)
        (out.decodes if n == 1 and layers is None and Scheduler._is_decode(request) else out.prefills).append(chunk)
        return chunk.cost

    # ---- after the model ran --------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance counters, append sampled tokens, finish on token-level stops.

        sampled: request_id → token for every chunk whose `samples` was True.
        Returns the requests that finished this step (their blocks are already freed).
        """
        finished = []
        for chunk in out.decodes + out.prefills:
            request = chunk.request
            if chunk.layers is not None:
                if not chunk.layers.last:         # part way through the layers: nothing to count yet
                    request.layers_done = chunk.layers.end
                    continue
                request.layers_done, request.layer_hidden = 0, None
            request.num_computed_tokens += chunk.num_new_tokens
            self.kv.cache_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)
            followers = [f for f in chunk.followers if self._fork(request, f, out)]
            for r in [request, *followers]:
                self._append(r, sampled.get(r.request_id), finished)
        return finished

    def _fork(self, source: Request, follower: Request, out: SchedulerOutput) -> bool:
        """Give `follower` the KV of `source`'s just-completed prompt: the cached full blocks
        attached, the rest on new blocks queued in out.block_copies. False (the follower is back in
        the waiting queue, its sample dropped) when blocks run out."""
        n = follower.num_prompt_tokens
        cached = self.kv.allocate(follower.request_id, follower.all_token_ids, n)
        if cached is None:
            self.running.remove(follower)
            follower.status = RequestStatus.WAITING
            self.waiting.append(follower)
            return False
        src, dst = self.kv.block_table(source.request_id), self.kv.block_table(follower.request_id)
        out.block_copies += [(src[i], dst[i]) for i in range(cached // self.kv.block_size, len(dst))]
        follower.num_computed_tokens = n
        self.kv.cache_blocks(follower.request_id, follower.all_token_ids, n)
        return True

    def _append(self, request: Request, token: int | None, finished: list[Request]) -> None:
        """Append a sampled token and finish the request on a token-level stop."""
        if token is None:
            return
        request.output_token_ids.append(token)
        reason = self._stop_reason(request, token)
        if reason is not None:
            finished.append(self.finish(request.request_id, reason))

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.sampling_params
        if not params.ignore_eos and token in request.eos_token_ids:
            return FinishReason.STOP
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        if request.handoff:
            return FinishReason.HANDOFF
        return None
