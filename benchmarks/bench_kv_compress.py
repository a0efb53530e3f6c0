"""What compressed preemption costs and saves (issue 16, item 3): the same requests run three times
on one engine thread, greedy, with the host's auto dtype:

- reference: a KV pool large enough that nothing is preempted;
- recompute: a pool ~1/3 of the peak demand, victims recompute (`--preemption-mode recompute`);
- compress:  the same small pool, victims kept in int8 and restored (`--preemption-mode compress`).

Printed (JSON lines, the last one the summary): preemptions and restores, wall time of each run
(compress ÷ recompute), tokens computed again (recompute only), and the token divergence compress
causes against the reference: requests whose tokens differ, and for those the share of their
tokens after the first preemption that still match. The recompute run's own divergence from the
reference is printed too (bf16 batches of another shape may round differently), so the part due to
int8 KV is the difference. Default model: SmolLM2-135M-Instruct (real weights; `small` when absent).

    python benchmarks/bench_kv_compress.py
    python benchmarks/bench_kv_compress.py --model small --requests 24 --max-tokens 96
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.host_info import host_line  # noqa: E402

# Plain English for prompts the real model reads as text (the traces carry lengths, not text).
SENTENCES = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator moves heat from the inside to the outside.",
    "List three ways to make a small apartment feel larger.",
    "What are the main differences between a virus and a bacterium?",
    "Summarize the plot of a detective novel in which the narrator is the culprit.",
    "Give step by step instructions for repotting a houseplant.",
    "Why does the sky look red at sunset and blue at noon?",
    "Translate the following sentence into French: the train leaves at nine.",
    "Describe the rules of chess to someone who has never played a board game.",
    "Compose a polite email declining an invitation to a conference.",
    "How do vaccines train the immune system to recognise a pathogen?",
]


def prompts_for(tokenizer, n: int, seed: int, min_tokens: int, max_tokens: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randrange(min_tokens, max_tokens + 1)
        ids: list[int] = []
        while len(ids) < target:
            ids += tokenizer.encode(" " + rng.choice(SENTENCES))
        out.append(ids[:target])
    return out


def run(build, prompts, params, **kw) -> dict:
    engine = build(**kw)
    preempted_at: dict[str, int] = {}       # request id → output tokens it had when first preempted
    recomputed = [0]
    preempt = engine.scheduler._preempt

    def spy(request, out):
        preempted_at.setdefault(request.request_id, request.num_output_tokens)
        recomputed[0] += request.num_computed_tokens
        preempt(request, out)
    engine.scheduler._preempt = spy
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    engine.check_integrity()
    p = engine.scheduler.preemption
    if p.counts["compress"]:
        recomputed[0] = 0                   # every victim kept its KV (the store's budget held)
    return {"outs": [o.token_ids for o in outs], "ids": [o.request_id for o in outs], "wall_s": wall,
            "num_blocks": engine.kv.num_blocks, "preemptions": dict(p.counts), "restores": p.restored,
            "tokens_lost": recomputed[0], "preempted_at": preempted_at,
            "copy_ms_per_block": round(p.copy_s_per_block * 1e3, 4),
            "prefill_tokens_per_s": round(p.rates.prefill_tokens_per_s, 1)}


def divergence(ref: list[list[int]], got: dict) -> dict:
    """Requests whose tokens differ from the reference; for those, the share of the tokens after
    their first preemption (from the start, when never preempted) that still match position by
    position, and where the first difference falls counted from that preemption (negative: before
    it, so batch shapes, not the preemption, changed the rounding)."""
    differ, kept, after = 0, 0, 0
    first_diffs = []
    for a, b, rid in zip(ref, got["outs"], got["ids"]):
        if a == b:
            continue
        differ += 1
        start = got["preempted_at"].get(rid, 0)
        first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        first_diffs.append(first - start)
        kept += first - start
        after += len(a) - start
    return {"requests_differing": differ, "of": len(ref),
            "tokens_after_preemption_matching": round(kept / after, 3) if after else None,
            "first_difference_after_preemption": sorted(first_diffs),
            "differing_never_preempted": sum(1 for a, b, rid in zip(ref, got["outs"], got["ids"])
                                             if a != b and rid not in got["preempted_at"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--pool-share", type=float, default=0.33, help="small pool ÷ the blocks every request needs at once")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from services.engine.builder import build_engine, load_tokenizer
    from services.engine.loader import resolve_model
    from services.engine.sampling_params import SamplingParams

    try:
        loaded = resolve_model(a.model)
    except Exception as e:      # noqa: BLE001 - no real weights here: the named random model still measures cost
        print(json.dumps({"note": f"{a.model} unavailable ({e}); using small"}), flush=True)
        a.model, loaded = "small", resolve_model("small")
    prompts = prompts_for(load_tokenizer(loaded), a.requests, a.seed, a.min_prompt, a.max_prompt)
    params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    block = 16
    peak = sum(-(-(len(x) + a.max_tokens) // block) for x in prompts)
    small = max(-(-(a.max_prompt + a.max_tokens) // block) + 1, int(peak * a.pool_share))

    def build(**kw):
        return build_engine(a.model, loaded=loaded, dtype=a.dtype, num_threads=a.threads, block_size=block, **kw)

    host = host_line()
    print(json.dumps({"host": host, "model": a.model, "dtype": a.dtype, "requests": a.requests,
                      "peak_blocks": peak, "small_pool_blocks": small}), flush=True)
    ref = run(build, prompts, params, num_blocks=peak + 8)
    rec = run(build, prompts, params, num_blocks=small, preemption_mode="recompute")
    com = run(build, prompts, params, num_blocks=small, preemption_mode="compress", kv_compress_fraction=1.0)
    for name, r in (("reference", ref), ("recompute", rec), ("compress", com)):
        print(json.dumps({"run": name, **{k: v for k, v in r.items() if k not in ("outs", "ids", "preempted_at")}}),
              flush=True)
    summary = {"bench": "kv_compress", "host": host, "model": a.model, "dtype": a.dtype,
               "compress_vs_recompute_wall": round(com["wall_s"] / rec["wall_s"], 3),
               "recompute_tokens_lost": rec["tokens_lost"],
               "compress_divergence": divergence(ref["outs"], com),
               "recompute_divergence": divergence(ref["outs"], rec)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
