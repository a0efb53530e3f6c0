"""The engine measurements of `make bench-engine`, written once for every system measured.

Pure Python (no torch, no project imports): the vLLM side imports this file inside vLLM's own venv.
A system is one callable, `generate(prompts, max_tokens) -> output token count`, that runs
`prompts` (lists of token ids) to exactly `max_tokens` tokens each (ignore_eos, greedy) and
returns once all are done. Every probe draws fresh random prompts per repeat, so a prefix cache
never serves one (systems also run with prefix caching off), and keeps the best of `repeats`.

- throughput "NxIxO": N prompts of I tokens → O tokens each; output tokens per second.
- decode "B@C": per-token latency of a decode step at batch B with C-token contexts:
  (time of B prompts → 1 + n tokens  −  time of the same-shaped B prompts → 1 token) / n.
  The prefill of both runs cancels; what is left is n decode steps at batch B (contexts C..C+n).
- prefill "L": latency of one L-token prompt → its first token.
"""
from __future__ import annotations

import random
import time
from typing import Callable

Generate = Callable[[list[list[int]], int], int]


def parse_list(text: str, cast: Callable = str) -> list:
    """"a,b,c" → [cast(a), cast(b), cast(c)]; "" (a probe kind left out) → []."""
    return [cast(x) for x in text.split(",") if x.strip()]


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(10, vocab - 1) for _ in range(length)] for _ in range(n)]


def _best(repeats: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeats))


def _timed(generate: Generate, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n_out = generate(prompts, max_tokens)
    return time.perf_counter() - t0, n_out


def throughput(generate: Generate, vocab: int, workload: str, repeats: int, seed: int = 0) -> dict:
    """{"probe": "throughput", "workload", "output_tokens_per_s", "total_tokens_per_s", "wall_s"}."""
    n, i, o = map(int, workload.split("x"))
    rng = random.Random(seed)
    best = None
    for _ in range(repeats):
        dt, n_out = _timed(generate, random_prompts(rng, n, i, vocab), o)
        if best is None or dt < best[0]:
            best = (dt, n_out)
    dt, n_out = best
    return {"probe": "throughput", "workload": workload, "wall_s": round(dt, 3),
            "output_tokens_per_s": round(n_out / dt, 1), "total_tokens_per_s": round((n * i + n_out) / dt, 1)}


def decode_latency(generate: Generate, vocab: int, batch: int, context: int, steps: int, repeats: int,
                   seed: int = 0) -> dict:
    """{"probe": "decode", "batch", "context", "ms_per_token"}: one decode step's wall time at `batch`."""
    rng = random.Random(seed)
    prefill_only = _best(repeats, lambda: _timed(generate, random_prompts(rng, batch, context, vocab), 1)[0])
    with_decode = _best(repeats, lambda: _timed(generate, random_prompts(rng, batch, context, vocab), 1 + steps)[0])
    ms = max(0.0, with_decode - prefill_only) / steps * 1e3
    return {"probe": "decode", "batch": batch, "context": context, "steps": steps, "ms_per_token": round(ms, 3)}


def prefill_latency(generate: Generate, vocab: int, length: int, repeats: int, seed: int = 0) -> dict:
    """{"probe": "prefill", "tokens", "ms"}: one prompt of `length` tokens to its first token."""
    rng = random.Random(seed)
    dt = _best(repeats, lambda: _timed(generate, random_prompts(rng, 1, length, vocab), 1)[0])
    return {"probe": "prefill", "tokens": length, "ms": round(dt * 1e3, 2)}


def run_all(generate: Generate, vocab: int, *, workloads: list[str], batches: list[int], context: int,
            decode_steps: int, prefill_lengths: list[int], repeats: int, emit: Callable[[dict], None]) -> None:
    """Every probe in a fixed order; `emit` gets each result as it is measured."""
    for wl in workloads:
        emit(throughput(generate, vocab, wl, repeats))
    for b in batches:
        emit(decode_latency(generate, vocab, b, context, decode_steps, repeats))
    for length in prefill_lengths:
        emit(prefill_latency(generate, vocab, length, repeats))


def key(result: dict) -> str:
    """The comparison name of a probe result: "throughput 64x256x128", "decode b8@512", "prefill 512"."""
    p = result["probe"]
    if p == "throughput":
        return f"throughput {result['workload']}"
    if p == "decode":
        return f"decode b{result['batch']}@{result['context']}"
    return f"prefill {result['tokens']}"


def better(a: dict, b: dict) -> dict:
    """The faster of two results of the same probe (higher throughput, lower latency)."""
    if a["probe"] == "throughput":
        return a if a["output_tokens_per_s"] >= b["output_tokens_per_s"] else b
    field = "ms_per_token" if a["probe"] == "decode" else "ms"
    return a if a[field] <= b[field] else b


def best_by_probe(rounds: list[list[dict]]) -> list[dict]:
    """Each probe's best result over rounds, in the first round's order (results without a probe dropped)."""
    best: dict[str, dict] = {}
    for results in rounds:
        for r in results:
            if "probe" in r:
                k = key(r)
                best[k] = better(best[k], r) if k in best else r
    return list(best.values())


def compare(ours: dict, theirs: dict) -> dict:
    """{"compare", "tandem", "vllm", "unit", "ratio"}; ratio > 1 means Tandem is faster."""
    p = ours["probe"]
    if p == "throughput":
        a, b, unit = ours["output_tokens_per_s"], theirs["output_tokens_per_s"], "output tok/s"
        ratio = a / b if b else None
    else:
        field = "ms_per_token" if p == "decode" else "ms"
        a, b, unit = ours[field], theirs[field], ("ms/token" if p == "decode" else "ms")
        ratio = b / a if a else None          # latencies: inverted so that > 1 is faster
    return {"compare": key(ours), "tandem": a, "vllm": b, "unit": unit,
            "ratio": None if ratio is None else round(ratio, 3)}
