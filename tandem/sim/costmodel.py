"""The cost model a simulated instance runs on: engine step time from the batch's shape, KV transfer
time from bytes, migration stage cost. Fitted by `tandem profile`, read by `tandem simulate/plan`.

DistServe's forms (Σ over the step's prefill chunks l_i, each after p_i tokens already computed;
Σ over its decodes of their contexts):

    prefill step  = a_p + b_p·Σl + c_p·Σ l·(l + 2p)     (l·(l+2p) is l² for a whole prompt; two
                                                        halves of a prompt add up to its l²)
    decode step   = a_d + b_d·Σctx + c_d·batch
    mixed step    = max(a_p, a_d) + the other terms of both
    KV transfer   = transfer_latency_s + bytes / transfer_bytes_per_s
    migration     = stages of (migration_stage_s + bytes / transfer_bytes_per_s)

A profile also states what it was measured on (model, dtype, block size, KV blocks per instance,
threads, host), so `tandem plan` can refuse a profile of another model or dtype.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np

PROFILE_VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class CostModel:
    prefill: tuple[float, float, float]        # (a_p s, b_p s/token, c_p s/token²)
    decode: tuple[float, float, float]         # (a_d s, b_d s/context token, c_d s/request)
    transfer_latency_s: float = 0.001
    transfer_bytes_per_s: float = 1e9
    migration_stage_s: float = 0.002
    kv_bytes_per_block: int = 0

    def prefill_s(self, chunks: Sequence[tuple[int, int]]) -> float:
        """A prefill-only step over chunks (l new tokens, p tokens already computed)."""
        a, b, c = self.prefill
        return a + sum(b * l + c * l * (l + 2 * p) for l, p in chunks)

    def decode_s(self, batch: int, context_tokens: int) -> float:
        a, b, c = self.decode
        return a + b * context_tokens + c * batch

    def step_s(self, chunks: Sequence[tuple[int, int]], batch: int, context_tokens: int) -> float:
        """One engine step: prefill chunks and `batch` decodes over `context_tokens` in all."""
        if not chunks:
            return self.decode_s(batch, context_tokens) if batch else 0.0
        if not batch:
            return self.prefill_s(chunks)
        a_p, a_d = self.prefill[0], self.decode[0]
        return max(a_p, a_d) + (self.prefill_s(chunks) - a_p) + (self.decode_s(batch, context_tokens) - a_d)

    def transfer_s(self, nbytes: float) -> float:
        return self.transfer_latency_s + nbytes / self.transfer_bytes_per_s

    def decode_run_s(self, steps: int, batch: int, context_tokens: int) -> float:
        """Time of `steps` decode-only steps of a fixed batch whose context grows by `batch` each
        step: Σ_{j<steps} decode_s(batch, ctx + j·batch), in closed form."""
        a, b, c = self.decode
        return steps * (a + c * batch + b * context_tokens) + b * batch * steps * (steps - 1) / 2

    def decode_steps_done(self, elapsed_s: float, batch: int, context_tokens: int, max_steps: int) -> int:
        """How many whole steps of decode_run_s fit in `elapsed_s` (0..max_steps)."""
        if elapsed_s <= 0:
            return 0
        a, b, c = self.decode
        base = a + c * batch + b * context_tokens                  # first step's time
        q = b * batch / 2                                          # T(j) = q·j² + (base − q)·j
        if q <= 0:
            j = int(elapsed_s / base) if base > 0 else max_steps
        else:
            lin = base - q
            j = int((-lin + math.sqrt(lin * lin + 4 * q * elapsed_s)) / (2 * q))
        j = max(0, min(j, max_steps))
        while j < max_steps and self.decode_run_s(j + 1, batch, context_tokens) <= elapsed_s + 1e-12:
            j += 1
        while j > 0 and self.decode_run_s(j, batch, context_tokens) > elapsed_s + 1e-12:
            j -= 1
        return j


@dataclasses.dataclass(frozen=True)
class Profile:
    """A measured (or hand-written) profile: the cost model plus what it was measured on."""
    cost: CostModel
    model: str
    dtype: str
    block_size: int = 16
    num_blocks: int = 4096                    # KV blocks per instance
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    threads: int | None = None
    num_layers: int = 0                       # KV streams per layer group: the last group's transfer is not overlapped
    host: dict = dataclasses.field(default_factory=dict)
    fit: dict = dataclasses.field(default_factory=dict)       # fit errors, for the record
    samples: dict = dataclasses.field(default_factory=dict)   # the measurements fitted

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["profile_version"] = PROFILE_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = "profile") -> "Profile":
        if not isinstance(d, dict) or "cost" not in d or "model" not in d:
            raise ProfileError(f"{where}: not a Tandem profile (no 'cost'/'model'); make one with "
                               "`tandem profile --model M --out PROFILE.json`")
        try:
            c = dict(d["cost"])
            cost = CostModel(prefill=tuple(float(x) for x in c.pop("prefill")),
                             decode=tuple(float(x) for x in c.pop("decode")),
                             **{k: (int(v) if k == "kv_bytes_per_block" else float(v)) for k, v in c.items()})
            fields = {f.name for f in dataclasses.fields(cls)} - {"cost"}
            prof = cls(cost=cost, **{k: v for k, v in d.items() if k in fields})
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{where}: bad profile field ({e}); re-run `tandem profile`") from None
        if len(cost.prefill) != 3 or len(cost.decode) != 3:
            raise ProfileError(f"{where}: cost.prefill and cost.decode need 3 coefficients each")
        for name in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs"):
            if not isinstance(getattr(prof, name), int) or getattr(prof, name) <= 0:
                raise ProfileError(f"{where}: {name} must be a positive integer, got {getattr(prof, name)!r}")
        if cost.transfer_bytes_per_s <= 0:
            raise ProfileError(f"{where}: cost.transfer_bytes_per_s must be > 0")
        return prof


def load_profile(path: str) -> Profile:
    """Raises ProfileError naming `path` when it is missing or not a profile."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ProfileError(f"--profile {path}: no such file; make one with `tandem profile`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"--profile {path}: cannot read it as JSON ({e})") from None
    return Profile.from_json(data, where=f"--profile {path}")


def save_profile(profile: Profile, path: str) -> None:
    with open(path, "w") as f:
        json.dump(profile.to_json(), f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------------ fitting

def _fit(X: np.ndarray, y: np.ndarray, names: Sequence[str]) -> tuple[tuple[float, ...], dict]:
    """Non-negative least squares on relative error (each row weighted 1/y, so short steps count
    as much as long ones): coefficients, and per-term/overall errors."""
    w = 1.0 / np.maximum(y, 1e-9)
    coef = _nnls(X * w[:, None], y * w)
    pred = X @ coef
    rel = np.abs(pred - y) / np.maximum(y, 1e-9)
    share = (X * coef).mean(axis=0) / max(float(pred.mean()), 1e-12)
    errors = {"mean_rel_error": float(rel.mean()), "max_rel_error": float(rel.max()), "points": int(len(y)),
              "terms": {n: {"coef": float(k), "share_of_time": float(s)} for n, k, s in zip(names, coef, share)}}
    # per term: how much worse the fit gets without it (refit on the others)
    for i, n in enumerate(names):
        keep = [j for j in range(len(names)) if j != i]
        sub = _nnls(X[:, keep] * w[:, None], y * w)
        sub_rel = np.abs(X[:, keep] @ sub - y) / np.maximum(y, 1e-9)
        errors["terms"][n]["mean_rel_error_without"] = float(sub_rel.mean())
    return tuple(float(k) for k in coef), errors


def _nnls(A: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """Least squares with x ≥ 0 by active-set elimination (few columns: plain lstsq per set)."""
    active = list(range(A.shape[1]))
    x = np.zeros(A.shape[1])
    for _ in range(iters):
        sol = np.linalg.lstsq(A[:, active], b, rcond=None)[0] if active else np.zeros(0)
        if (sol >= 0).all():
            x[:] = 0
            x[active] = sol
            return x
        active = [a for a, s in zip(active, sol) if s >= 0] if (sol >= 0).any() else []
    return x


def fit_prefill(samples: Sequence[tuple[Sequence[tuple[int, int]], float]]) -> tuple[tuple[float, float, float], dict]:
    """samples: (chunks [(l, p), …], seconds) → ((a_p, b_p, c_p), fit errors)."""
    if len(samples) < 3:
        raise ValueError(f"prefill fit needs at least 3 samples, got {len(samples)}")
    X = np.array([[1.0, sum(l for l, _ in ch), sum(l * (l + 2 * p) for l, p in ch)] for ch, _ in samples])
    y = np.array([t for _, t in samples], dtype=float)
    return _fit(X, y, ("a_p", "b_p·Σl", "c_p·Σl²"))


def fit_decode(samples: Sequence[tuple[int, int, float]]) -> tuple[tuple[float, float, float], dict]:
    """samples: (batch, total context tokens, seconds) → ((a_d, b_d, c_d), fit errors)."""
    if len(samples) < 3:
        raise ValueError(f"decode fit needs at least 3 samples, got {len(samples)}")
    X = np.array([[1.0, float(ctx), float(b)] for b, ctx, _ in samples])
    y = np.array([t for _, _, t in samples], dtype=float)
    return _fit(X, y, ("a_d", "b_d·Σctx", "c_d·batch"))


def fit_transfer(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """samples: (bytes, seconds) → (latency s, bytes/s) by least squares on t = lat + bytes/bw."""
    X = np.array([[1.0, float(n)] for n, _ in samples])
    y = np.array([t for _, t in samples], dtype=float)
    lat, per_byte = _nnls(X, y)
    return float(lat), float(1.0 / per_byte) if per_byte > 0 else 1e12
