"""Output-length prediction, learned online from the requests this router completed.

    p = OutputPredictor()
    q = p.predict(prompt_ids, max_tokens, hint=0)      # Quantiles(p10, p50, p90, source)
    ...                                                 # the request runs
    p.observe(prompt_ids, max_tokens, output_tokens, hint=0, predicted=q)

Features, each what a real deployment has (ALISE's retrieval idea, no offline training step):
- the prompt's leading blocks (PREFIX_BLOCK_TOKENS each): the system prompt / application. Lengths
  seen after the same first 1..PREFIX_DEPTH blocks are kept per prefix hash (the deepest prefix
  with MIN_SAMPLES observations is used);
- a similarity search over recent completed prompts: MinHash signatures of token NGRAM-grams,
  banded into LSH buckets; the lengths of the most similar recent prompts (Jaccard estimate at
  least MIN_SIMILARITY);
- max_tokens (every quantile is clipped to it) and the prompt length (the fallback pools
  observations by prompt-length bucket);
- the client hint `expected_output_tokens`: scaled by the observed/hint ratios seen so far.

Sources are tried most specific first: hint, similar prompts, prefix, prompt-length bucket, all
observations; with nothing learned yet the prediction is max_tokens / 2 (p10 1, p90 max_tokens).
Quantiles are empirical over the chosen source's samples.

Memory is bounded: HISTORY recent prompts for the similarity index, WINDOW lengths per table
entry, MAX_PREFIXES prefix entries (least recently used dropped).

Not thread-safe; the router calls it from its event loop only. Each call costs O(prompt length x
NUM_HASHES) in numpy plus O(candidates).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence

import numpy as np

PREFIX_BLOCK_TOKENS = 16      # tokens per prefix block (the engines' default KV block size)
PREFIX_DEPTH = 4              # prefixes of the first 1..4 blocks are keys
NGRAM = 3
NUM_HASHES = 32
BANDS = 16                    # LSH: 16 bands of 2 rows (a pair at similarity 0.3 shares one with p 0.78, at 0.5 with p 0.99)
MIN_SIMILARITY = 0.3
NEIGHBOURS = 16
MIN_SAMPLES = 3
WINDOW = 128                  # lengths kept per prefix / length bucket / hint ratios
HISTORY = 2048                # completed prompts kept for the similarity search
MAX_PREFIXES = 4096


@dataclasses.dataclass(frozen=True)
class Quantiles:
    """Predicted output tokens: 10th, 50th, 90th percentile, and which feature gave them."""
    p10: float
    p50: float
    p90: float
    source: str                # hint | similar | prefix | length | global | prior


def _quantiles(values: Sequence[float], max_tokens: int, source: str) -> Quantiles:
    a = np.minimum(np.asarray(values, dtype=np.float64), max_tokens)
    p10, p50, p90 = np.quantile(a, (0.1, 0.5, 0.9))
    return Quantiles(max(1.0, p10), max(1.0, p50), max(1.0, p90), source)


def _length_bucket(n: int) -> int:
    return max(0, int(math.log2(max(1, n))))


class _MinHasher:
    """MinHash signatures of token n-grams: NUM_HASHES seeded splitmix64 mixes of each n-gram id
    (a linear hash a*x + b would be nearly order-preserving on small ids: not min-wise)."""

    def __init__(self, seed: int = 0):
        self.seeds = np.random.default_rng(seed).integers(0, 1 << 63, NUM_HASHES, dtype=np.uint64)

    def signature(self, tokens: Sequence[int]) -> np.ndarray | None:
        """uint64[NUM_HASHES], or None for a prompt shorter than one n-gram."""
        t = np.asarray(tokens, dtype=np.uint64)
        if t.size < NGRAM:
            return None
        grams = t[:t.size - NGRAM + 1].copy()       # grams: [G] one id per n-gram
        for k in range(1, NGRAM):
            grams = _mix(grams ^ t[k:t.size - NGRAM + 1 + k])
        grams = np.unique(grams)
        return _mix(self.seeds[:, None] ^ grams[None, :]).min(axis=1)    # [NUM_HASHES, G] → [NUM_HASHES]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (multiplications wrap mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class OutputPredictor:
    def __init__(self, seed: int = 0):
        self._hasher = _MinHasher(seed)
        self._prefix: collections.OrderedDict[int, collections.deque] = collections.OrderedDict()
        self._length: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=WINDOW))
        self._all: collections.deque = collections.deque(maxlen=WINDOW * 4)
        self._hint_ratio: collections.deque = collections.deque(maxlen=WINDOW)
        self._history: collections.deque = collections.deque()      # (id, signature, output tokens)
        self._buckets: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
        self._next_id = 0
        self.observations = 0

    # ---- features --------------------------------------------------------------------------
    @staticmethod
    def _prefix_keys(prompt: Sequence[int]) -> list[int]:
        """Hashes of the prompt's first 1..PREFIX_DEPTH whole blocks, shortest first."""
        return [hash(tuple(prompt[:d * PREFIX_BLOCK_TOKENS])) for d in range(1, PREFIX_DEPTH + 1)
                if len(prompt) >= d * PREFIX_BLOCK_TOKENS]

    @staticmethod
    def _bands(sig: np.ndarray) -> list[tuple[int, int]]:
        rows = NUM_HASHES // BANDS
        return [(b, hash(sig[b * rows:(b + 1) * rows].tobytes())) for b in range(BANDS)]

    def _similar(self, sig: np.ndarray) -> list[int]:
        """Output lengths of the NEIGHBOURS most similar recent prompts (similarity >= MIN_SIMILARITY)."""
        candidates: set[int] = set()
        for band in self._bands(sig):
            candidates |= self._buckets.get(band, set())
        if not candidates:
            return []
        first = self._history[0][0] if self._history else 0
        scored = []
        for cid in candidates:
            _, other, n = self._history[cid - first]
            sim = float(np.count_nonzero(other == sig)) / NUM_HASHES
            if sim >= MIN_SIMILARITY:
                scored.append((sim, cid, n))
        scored.sort(reverse=True)
        return [n for _, _, n in scored[:NEIGHBOURS]]

    # ---- the interface ---------------------------------------------------------------------
    def predict(self, prompt: Sequence[int], max_tokens: int, hint: int = 0) -> Quantiles:
        """Quantiles of the output length for this request, each in [1, max_tokens].
        Precondition: max_tokens >= 1; hint 0 (none) or in [1, max_tokens] (validated at the edge)."""
        if hint > 0:
            if len(self._hint_ratio) >= MIN_SAMPLES:
                return _quantiles([hint * r for r in self._hint_ratio], max_tokens, "hint")
            return Quantiles(max(1.0, hint / 2), float(hint), float(min(max_tokens, hint * 2)), "hint")
        sig = self._hasher.signature(prompt)
        if sig is not None:
            near = self._similar(sig)
            if len(near) >= MIN_SAMPLES:
                return _quantiles(near, max_tokens, "similar")
        for key in reversed(self._prefix_keys(prompt)):
            seen = self._prefix.get(key)
            if seen is not None and len(seen) >= MIN_SAMPLES:
                return _quantiles(seen, max_tokens, "prefix")
        seen = self._length.get(_length_bucket(len(prompt)))
        if seen is not None and len(seen) >= MIN_SAMPLES:
            return _quantiles(seen, max_tokens, "length")
        if len(self._all) >= MIN_SAMPLES:
            return _quantiles(self._all, max_tokens, "global")
        return Quantiles(1.0, max(1.0, max_tokens / 2), float(max_tokens), "prior")

    def observe(self, prompt: Sequence[int], max_tokens: int, output_tokens: int, hint: int = 0) -> None:
        """Learn from a request that produced `output_tokens` (> 0; a no-op otherwise)."""
        if output_tokens <= 0:
            return
        self.observations += 1
        if hint > 0:
            self._hint_ratio.append(output_tokens / hint)
        for key in self._prefix_keys(prompt):
            seen = self._prefix.get(key)
            if seen is None:
                seen = self._prefix[key] = collections.deque(maxlen=WINDOW)
                if len(self._prefix) > MAX_PREFIXES:
                    self._prefix.popitem(last=False)
            else:
                self._prefix.move_to_end(key)
            seen.append(output_tokens)
        self._length[_length_bucket(len(prompt))].append(output_tokens)
        self._all.append(output_tokens)
        sig = self._hasher.signature(prompt)
        if sig is not None:
            self._remember(sig, output_tokens)

    def _remember(self, sig: np.ndarray, output_tokens: int) -> None:
        cid = self._next_id
        self._next_id += 1
        self._history.append((cid, sig, output_tokens))
        for band in self._bands(sig):
            self._buckets[band].add(cid)
        if len(self._history) > HISTORY:
            old, old_sig, _ = self._history.popleft()
            for band in self._bands(old_sig):
                ids = self._buckets[band]
                ids.discard(old)
                if not ids:
                    del self._buckets[band]

    def warm_start(self, lines: Iterable[str], source: str = "warm start") -> int:
        """observe() each JSON line {"prompt_token_ids": [...], "output_tokens": N, "max_tokens": M
        (optional), "expected_output_tokens": H (optional)}; returns how many were used. Raises
        ValueError naming the source and line of a malformed one."""
        used = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = [int(t) for t in row["prompt_token_ids"]]
                out = int(row["output_tokens"])
                max_tokens = int(row.get("max_tokens", out))
                hint = int(row.get("expected_output_tokens", 0))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{source}, line {number}: expected {{\"prompt_token_ids\": [...], "
                                 f"\"output_tokens\": N}} ({type(e).__name__}: {e})") from None
            self.observe(prompt, max_tokens, out, hint)
            used += 1
        return used


class PredictionError:
    """Live error of the predictor over the last `window` completed requests: mean absolute error
    of the median, Spearman rank correlation of median vs actual, and how often the actual length
    fell inside [p10, p90]."""

    def __init__(self, window: int = 512):
        self._pairs: collections.deque = collections.deque(maxlen=window)    # (p10, p50, p90, actual)

    def add(self, predicted: Quantiles, actual: int) -> None:
        self._pairs.append((predicted.p10, predicted.p50, predicted.p90, actual))

    def __len__(self) -> int:
        return len(self._pairs)

    def mae(self) -> float:
        return float(np.mean([abs(p50 - a) for _, p50, _, a in self._pairs])) if self._pairs else 0.0

    def coverage(self) -> float:
        return float(np.mean([lo <= a <= hi for lo, _, hi, a in self._pairs])) if self._pairs else 0.0

    def spearman(self) -> float:
        """0 with fewer than 3 pairs or a constant side (no ranking to compare)."""
        if len(self._pairs) < 3:
            return 0.0
        pred = _ranks([p50 for _, p50, _, _ in self._pairs])
        act = _ranks([a for _, _, _, a in self._pairs])
        if pred.std() == 0 or act.std() == 0:
            return 0.0
        return float(np.corrcoef(pred, act)[0, 1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks with ties given their mean rank (as Spearman's rho needs)."""
    a = np.asarray(values, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=np.float64)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]
