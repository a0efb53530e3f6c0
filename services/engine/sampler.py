"""Turns a batch of next-token logits into tokens (plus their logprobs).

Rows with logit adjustments (penalties, logit_bias, min_tokens: services/engine/logits_adjust.py)
have them applied to a float32 copy of their logits first; the rest go straight on. Greedy rows
take the argmax. Random rows divide by the temperature, apply min-p, top-k then top-p
(nucleus) filtering and sample with the exponential race: token = argmax(p / E) with
E ~ Exponential(1) drawn independently per vocabulary entry, which picks token i with
probability p_i. We evaluate it in log space, argmax(log p - log E), which is the same
ordering (the Gumbel-max trick) but cannot produce 0/0 or inf/inf.

Reproducibility: a row with `seed` draws its V uniforms from a torch.Generator seeded with
`noise_seed(seed, output_index)`, so its token depends only on its own logits, its seed and
the position of the token in its output -- not on the batch it sits in, its row, a
preemption (recompute) or the process that runs it (same device type). Rows without a seed
share one module-level generator per device and draw their noise in one batched call.

Rows are gathered with advanced indexing (x[idx]). Either gather costs well under a millisecond
on a quiet CPU (bf16 [16, 49152], one thread: index_select 0.04 ms, x[idx] 0.26 ms); an earlier
87 ms reading for index_select was the host's other work descheduling torch's second thread.

Logprobs are always of the model's raw distribution: log_softmax of the unscaled float32
logits, whatever temperature / top-k / top-p the row used to pick the token.
"""
from __future__ import annotations

import math

import secrets
from dataclasses import dataclass
from typing import Sequence

import torch

from services.engine.sampling_params import SamplingParams

_SEED_MULT = 1_000_003
_SEED_MOD = 2**63

# One generator per device for rows without a seed (created lazily, randomly seeded unless
# seed_shared_generators() fixed the seed).
_shared_generators: dict[torch.device, torch.Generator] = {}
_shared_seed: int | None = None


def noise_seed(seed: int, output_index: int) -> int:
    """Seed of the generator that samples token `output_index` of a request with `seed`."""
    return (int(seed) * _SEED_MULT + int(output_index)) % _SEED_MOD


def shared_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """The generator used by rows without a seed on `device`."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = _shared_generators.get(device)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(secrets.randbits(63) if _shared_seed is None else _shared_seed)
        _shared_generators[device] = gen
    return gen


def seed_shared_generators(seed: int) -> None:
    """Make unseeded sampling repeatable (tests, benchmarks): every shared generator restarts from `seed`."""
    global _shared_seed
    _shared_seed = int(seed) % _SEED_MOD
    _shared_generators.clear()


@dataclass
class SamplerOutput:
    token_ids: list[int]                                   # one per row
    logprobs: list[float]                                  # chosen token's logprob (raw distribution)
    top_logprobs: list[list[tuple[int, float]] | None]     # top-n per row when params.logprobs > 0


class Sampler:
    """Stateless apart from the shared generators; call it once per step on the [B, V] logits."""

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 output_indices: Sequence[int], adjust=None) -> SamplerOutput:
        """logits: [B, V] raw next-token logits. adjust: None, or an object with `rows` (ascending
        batch rows) and `apply(x)` that changes x [len(rows), V] float32 (a copy of those rows) in
        place (services/engine/logits_adjust.py: penalties, logit_bias, min_tokens). Rows outside it,
        greedy ones above all, take the plain path."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch or len(output_indices) != batch:
            raise ValueError(f"{batch} logits rows but {len(params)} params and "
                             f"{len(output_indices)} output indices")
        if batch == 0:
            return SamplerOutput([], [], [])
        device = logits.device
        # Converting bf16 logits to float32 is exact, so argmax and sampling see the model's values;
        # log-softmax work (logprobs) is done only for the rows that ask for it.
        random_rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
        adj_rows = adjust.rows if adjust is not None else []
        if not random_rows and not adj_rows:
            tokens = greedy_argmax(logits)
        else:
            tokens = torch.empty(batch, dtype=torch.long, device=device)
            pos: dict[int, int] = {}
            if adj_rows:
                pos = {row: j for j, row in enumerate(adj_rows)}
                if len(adj_rows) == batch:                                         # every row: no gather
                    adjusted = logits.to(torch.float32, copy=True)                 # [A, V]
                else:
                    adjusted = logits[torch.tensor(adj_rows, device=device)].float()   # [A, V]
                adjust.apply(adjusted)
            greedy_rows = [i for i, p in enumerate(params) if p.temperature == 0.0 and i not in pos]
            if greedy_rows:
                g_idx = torch.tensor(greedy_rows, device=device)
                tokens[g_idx] = greedy_argmax(logits[g_idx])
            adj_greedy = [i for i in adj_rows if params[i].temperature == 0.0]
            if adj_greedy:
                chosen = adjusted if len(adj_greedy) == len(adj_rows) else \
                    adjusted[torch.tensor([pos[i] for i in adj_greedy], device=device)]
                tokens[torch.tensor(adj_greedy, device=device)] = greedy_argmax(chosen)
            if random_rows:
                r_idx = torch.tensor(random_rows, device=device)
                x = logits[r_idx].float()                            # [R, V]
                swap = [(j, pos[i]) for j, i in enumerate(random_rows) if i in pos]
                if swap:
                    x.index_copy_(0, torch.tensor([j for j, _ in swap], device=device),
                                  adjusted[torch.tensor([a for _, a in swap], device=device)])
                tokens[r_idx] = self._sample(x, [params[i] for i in random_rows],
                                             [output_indices[i] for i in random_rows])

        # chosen logprob = logit - logsumexp(logits) for the rows that ask (params.logprobs not
        # None); NaN for the others. One device->host copy.
        token_ids = tokens.tolist()
        logprobs = [math.nan] * batch
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        x = None
        if lp_rows:
            lp_idx = torch.tensor(lp_rows, device=device)
            x = logits[lp_idx].float()                      # [R, V]
            chosen = x.gather(1, tokens[lp_idx].unsqueeze(1)).squeeze(1) - torch.logsumexp(x, dim=-1)
            for i, v in zip(lp_rows, chosen.tolist()):
                logprobs[i] = v

        top: list[list[tuple[int, float]] | None] = [None] * batch
        top_rows = [j for j, i in enumerate(lp_rows) if params[i].logprobs]
        if top_rows:
            n_max = min(max(params[lp_rows[j]].logprobs for j in top_rows), vocab)
            t_idx = torch.tensor(top_rows, device=device)
            vals, ids = torch.log_softmax(x[t_idx], dim=-1).topk(n_max, dim=-1)
            vals, ids = vals.cpu().tolist(), ids.cpu().tolist()
            for k, j in enumerate(top_rows):
                i = lp_rows[j]
                n = min(params[i].logprobs, vocab)
                top[i] = list(zip(ids[k][:n], vals[k][:n]))
        return SamplerOutput(token_ids, logprobs, top)

    @staticmethod
    def _sample(x: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> torch.Tensor:
        """Sample one token per row of x [R, V] (float32, unscaled) with temperature/min-p/top-k/top-p."""
        rows, vocab = x.shape
        device = x.device
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        scores = x / temps.unsqueeze(1)

        mp = [j for j, p in enumerate(params) if p.min_p > 0.0]
        if mp:
            m_idx = torch.tensor(mp, device=device)
            scores.index_copy_(0, m_idx, _min_p(scores[m_idx], [params[j].min_p for j in mp]))

        filt = [j for j, p in enumerate(params)
                if (0 < p.top_k < vocab) or p.top_p < 1.0]
        if filt:
            f_idx = torch.tensor(filt, device=device)
            scores.index_copy_(0, f_idx, _top_k_top_p(
                scores[f_idx],
                [params[j].top_k for j in filt], [params[j].top_p for j in filt]))

        # V uniforms per row: seeded rows from their own generator, the rest from the shared one.
        seeded = [j for j, p in enumerate(params) if p.seed is not None]
        if not seeded:
            u = torch.rand(rows, vocab, generator=shared_generator(device), device=device)
        else:
            u = torch.empty(rows, vocab, dtype=torch.float32, device=device)
            for j in seeded:
                gen = torch.Generator(device=device)
                gen.manual_seed(noise_seed(params[j].seed, output_indices[j]))
                u[j] = torch.rand(vocab, generator=gen, device=device)
            unseeded = [j for j, p in enumerate(params) if p.seed is None]
            if unseeded:
                u_idx = torch.tensor(unseeded, device=device)
                u[u_idx] = torch.rand(len(unseeded), vocab, generator=shared_generator(device), device=device)
        # E = -log(u) in (0, 87]; argmax(p / E) == argmax(scores - log E) (softmax's shift is per row).
        u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - 2.0**-24)
        race = scores - torch.log(-torch.log(u))
        return race.argmax(dim=-1)


_ARGMAX_CHUNK = 512


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (any float dtype) → [B] int64: torch.argmax of the float32 logits, exactly
    (the first index among equal maxima; a NaN counts as the maximum, the first NaN wins).

    On the CPU with B >= 2 in two levels: the max of each 512-entry chunk (amax is vectorised),
    the first chunk holding the row's max (argmax over B x V/512), then argmax inside that chunk
    alone. torch's CPU argmax walks the row with one comparison per entry: measured on a Zen 4
    core, [32, 32000] took 0.93 ms in one argmax and 0.21 ms in two levels ([8, 32000]: 0.24 vs
    0.09 ms); at B = 1 the one argmax (32 us) is as fast, so it stays. Converting bf16 to float32
    is exact, so the token is the model's argmax.
    """
    x = logits.float()
    rows, vocab = x.shape
    n = vocab // _ARGMAX_CHUNK
    if x.device.type != "cpu" or rows < 2 or n < 2:
        return x.argmax(dim=-1)
    chunk_max = x[:, :n * _ARGMAX_CHUNK].view(rows, n, _ARGMAX_CHUNK).amax(dim=-1)        # [B, n]
    if n * _ARGMAX_CHUNK < vocab:                                                         # the tail: one more "chunk"
        chunk_max = torch.cat([chunk_max, x[:, n * _ARGMAX_CHUNK:].amax(dim=-1, keepdim=True)], dim=1)
    start = chunk_max.argmax(dim=-1) * _ARGMAX_CHUNK                                      # [B]
    cols = (start[:, None] + torch.arange(_ARGMAX_CHUNK)).clamp_(max=vocab - 1)           # [B, chunk]
    # A clamped tail repeats column vocab-1 after itself: argmax's first index is still the true one.
    return start + x.gather(1, cols).argmax(dim=-1)


def _min_p(scores: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Set entries of scores [R, V] (temperature applied) whose probability is below min_p x the
    row's top probability to -inf: p_i < min_p * p_max  <=>  s_i < s_max + log(min_p)."""
    threshold = scores.amax(dim=-1, keepdim=True) + torch.log(
        torch.tensor(min_p, dtype=torch.float32, device=scores.device)).unsqueeze(1)      # [R, 1]
    return scores.masked_fill(scores < threshold, float("-inf"))


def _top_k_top_p(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set filtered-out entries of scores [R, V] to -inf. top_k 0 and top_p 1.0 disable a filter.

    Exact with ties: entries are ranked by a stable descending sort (lower id first among
    equals, like argmax), top-k keeps the first k ranks and top-p keeps the smallest prefix of
    the ranking whose probability (after top-k, renormalised) reaches top_p. Rank 0 is kept.
    """
    rows, vocab = scores.shape
    device = scores.device
    neg_inf = float("-inf")
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=device)
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k], device=device)
    remove = ranks.unsqueeze(0) >= k.unsqueeze(1)
    if any(p < 1.0 for p in top_p):
        sorted_scores = sorted_scores.masked_fill(remove, neg_inf)
        probs = torch.softmax(sorted_scores, dim=-1)
        cum = probs.cumsum(dim=-1)
        # probability mass strictly before each rank; keep ranks while it is still < top_p
        before = torch.cat((torch.zeros(rows, 1, device=device), cum[:, :-1]), dim=1)
        p = torch.tensor([pp if pp < 1.0 else 2.0 for pp in top_p], dtype=torch.float32, device=device)
        remove |= before >= p.unsqueeze(1)
    remove[:, 0] = False
    filtered_sorted = sorted_scores.masked_fill(remove, neg_inf)
    return torch.empty_like(scores).scatter_(1, order, filtered_sorted)
