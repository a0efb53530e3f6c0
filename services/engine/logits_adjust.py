"""Per-request logit adjustments before sampling: logit_bias, min_tokens and the repetition,
frequency and presence penalties (SamplingParams says what each does and in which order).

One LogitsAdjuster per engine (the runner owns it). The penalties need, per request, how often
each vocabulary entry occurs in its output and whether it occurs in its prompt. Those live in
pooled dense tensors, one slot (row) per request that has penalties:

    counts: [slots, V] float32   output token counts
    in_prompt: [slots, V] bool   the prompt's tokens (repetition penalty)

kept incrementally: each step adds only the output tokens a slot has not counted yet (one
index_put_ for the whole batch; normally one token per row), never recounting a history. A slot is
built from the request's own token lists the first time it is sampled here, so a request adopted
after a KV handoff or a migration, or recomputed after preemption, gets the same state it had on
the instance before: the state is a function of prompt and output, which travel with the request.
A slot is reused once its request has finished (or the id now names another Request object).

Rows without adjustments are left to the sampler's fast path: `prepare` returns None when no row
of a step has any. The structured-output token mask (services/engine/grammar.py) is one more
adjustment of the same kind, `combine`d after these: rows that need it and an in-place change of
their float32 logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from services.engine.request import Request


@dataclass
class _Slot:
    index: int
    request: Request
    num_counted: int = 0                  # output tokens already in counts[index]
    bias_ids: torch.Tensor | None = None      # [k] int64
    bias_values: torch.Tensor | None = None   # [k] float32


class Adjustment:
    """The adjustments of one step: `rows` (batch rows it changes, ascending) and `apply`."""

    def __init__(self, adjuster: "LogitsAdjuster", rows: list[int], requests: list[Request]):
        self.rows, self._adjuster, self._requests = rows, adjuster, requests

    def apply(self, x: torch.Tensor) -> None:
        """x: [len(rows), V] float32, the raw logits of `rows` (a copy): changed in place."""
        self._adjuster._apply(x, self._requests)


class Combined:
    """Several adjustments as one: rows the union, each part applied in order to its own rows."""

    def __init__(self, parts: list):
        self._parts = parts
        self.rows = sorted(set().union(*(p.rows for p in parts)))

    def apply(self, x: torch.Tensor) -> None:
        pos = {row: j for j, row in enumerate(self.rows)}
        for part in self._parts:
            if part.rows == self.rows:
                part.apply(x)
                continue
            idx = torch.tensor([pos[row] for row in part.rows], device=x.device)
            y = x[idx]
            part.apply(y)
            x.index_copy_(0, idx, y)


def combine(*parts):
    """The adjustments that are not None as one (None when all are, the one itself when alone)."""
    present = [p for p in parts if p is not None]
    if len(present) <= 1:
        return present[0] if present else None
    return Combined(present)


def _needs(r: Request) -> bool:
    p = r.sampling_params
    return p.has_penalties or bool(p.logit_bias) or p.min_tokens > len(r.output_token_ids)


class LogitsAdjuster:
    def __init__(self, vocab_size: int, device: torch.device, initial_slots: int = 8):
        self.vocab_size, self.device = vocab_size, device
        self.counts = torch.zeros(initial_slots, vocab_size, dtype=torch.float32, device=device)
        self.in_prompt = torch.zeros(initial_slots, vocab_size, dtype=torch.bool, device=device)
        self._slots: dict[str, _Slot] = {}
        self._free: list[int] = list(range(initial_slots - 1, -1, -1))

    def prepare(self, requests: Sequence[Request]) -> Adjustment | None:
        """The step's adjustment for the sampled rows `requests` (row order); None if no row has one."""
        rows = [i for i, r in enumerate(requests) if _needs(r)]
        if not rows:
            return None
        return Adjustment(self, rows, [requests[i] for i in rows])

    @property
    def num_slots_held(self) -> int:
        return len(self._slots)

    def release(self, request_id: str) -> None:
        """Drop a request's state. Safe no-op for an unknown id."""
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot.index)

    # ---- the step ---------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, requests: list[Request]) -> None:
        device = x.device
        neg_inf = float("-inf")
        # logit_bias: one accumulate over every (row, id) pair
        bias = [(j, self._slot(r)) for j, r in enumerate(requests) if r.sampling_params.logit_bias]
        if bias:
            rows = torch.cat([torch.full_like(s.bias_ids, j) for j, s in bias])
            x.index_put_((rows, torch.cat([s.bias_ids for _, s in bias])),
                         torch.cat([s.bias_values for _, s in bias]), accumulate=True)
        # min_tokens: EOS (unless ignored) and stop ids cannot be sampled yet
        block_rows, block_ids = [], []
        for j, r in enumerate(requests):
            p = r.sampling_params
            if p.min_tokens > len(r.output_token_ids):
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
                block_rows += [j] * len(ids)
                block_ids += ids
        if block_ids:
            x[torch.tensor(block_rows, device=device), torch.tensor(block_ids, device=device)] = neg_inf
        # penalties
        pen = [j for j, r in enumerate(requests) if r.sampling_params.has_penalties]
        if pen:
            slots = self._sync([requests[j] for j in pen])
            s_idx = torch.tensor(slots, device=device)
            counts = self.counts[s_idx]                         # [P, V]
            seen_out = counts > 0                                              # [P, V]
            params = [requests[j].sampling_params for j in pen]
            rep = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
            freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device)
            pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device)
            p_idx = torch.tensor(pen, device=device)
            y = x[p_idx]                                        # [P, V]
            if any(p.repetition_penalty != 1.0 for p in params):
                seen = seen_out | self.in_prompt[s_idx]
                r = rep.unsqueeze(1)
                y = torch.where(seen, torch.where(y > 0, y / r, y * r), y)
            y = y - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * seen_out.float()
            x.index_copy_(0, p_idx, y)

    def _slot(self, r: Request) -> _Slot:
        """r's slot, made (and its static parts built) on first use."""
        slot = self._slots.get(r.request_id)
        if slot is not None and slot.request is r:
            return slot
        if slot is not None:                          # the id now names another request
            self.release(r.request_id)
        if not self._free:
            self._reclaim()
        index = self._free.pop()
        slot = self._slots[r.request_id] = _Slot(index, r)
        p = r.sampling_params
        if p.logit_bias:
            slot.bias_ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=self.device)
            slot.bias_values = torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32, device=self.device)
        if p.has_penalties:
            self.counts[index].zero_()
            self.in_prompt[index].zero_()
            if p.repetition_penalty != 1.0:
                self.in_prompt[index, torch.tensor(r.prompt_token_ids, dtype=torch.long, device=self.device)] = True
        return slot

    def _sync(self, requests: list[Request]) -> list[int]:
        """Count the output tokens each request's slot has not seen; returns the slot indices."""
        slots, rows, tokens = [], [], []
        for r in requests:
            slot = self._slot(r)
            new = r.output_token_ids[slot.num_counted:]
            if new:
                rows += [slot.index] * len(new)
                tokens += new
                slot.num_counted += len(new)
            slots.append(slot.index)
        if tokens:
            self.counts.index_put_((torch.tensor(rows, device=self.device), torch.tensor(tokens, device=self.device)),
                                   torch.ones(len(tokens), device=self.device), accumulate=True)
        return slots

    def _reclaim(self) -> None:
        """Free the slots of finished requests; double the pool when every slot is still live."""
        for rid, slot in list(self._slots.items()):
            if slot.request.is_finished:
                self.release(rid)
        if self._free:
            return
        n = self.counts.shape[0]
        self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self.in_prompt = torch.cat([self.in_prompt, torch.zeros_like(self.in_prompt)])
        self._free = list(range(2 * n - 1, n - 1, -1))
