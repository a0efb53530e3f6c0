"""What n > 1 costs at prefill: n choices of one prompt against one choice, in one engine, one run.

The router turns a request with n choices into n requests of the same prompt (router/request/choices.py);
the engine's scheduler lets one compute the prompt while the others wait, and they follow the chunk
that completes it: sampled from its last row in the same step, its KV shared and its last block
copied (Scheduler._twin_key, ScheduledChunk.followers). Measured here:

  n1        one request (max_tokens 1: its prefill and first token)
  n4        four requests of one prompt (seeds 0..3, temperature 1), added together: the time until
            all four have their first token
  n4_apart  four requests of four different prompts of the same length: what the choices would
            cost if each were prefilled (the baseline sharing saves against)

Each round uses fresh prompts (no cache carried over), the three cases in rotating order; the
figures are medians over rounds, with the prompt tokens each case computed. Goal (issue 19):
n4 / n1 <= 1.3. Prints the host line, one JSON line per prompt length, and a last headline line.

    .venv/bin/python benchmarks/bench_choices.py [--model small] [--lengths 512,2048] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host_info import host_line  # noqa: E402


def _run(engine, prompts: list[list[int]], seeds: list[int]) -> tuple[float, int]:
    """(seconds until every request has its first token, prompt tokens computed)."""
    from services.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    for prompt, seed in zip(prompts, seeds):
        engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=1.0, seed=seed, ignore_eos=True,
                                                  detokenize=False))
    computed = 0
    while engine.has_unfinished():
        engine.step()
        computed += engine.last_step_prefill_tokens
    return time.perf_counter() - t0, computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from services.engine.builder import build_engine

    print(json.dumps(host_line()), flush=True)
    engine = build_engine(args.model, dtype=args.dtype, num_threads=args.threads, max_num_batched_tokens=8192,
                          max_model_len=4096, kv_memory_gib=2)
    vocab = engine.config.model.vocab_size
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    _run(engine, [prompt(64)], [0])                                    # warm-up
    lines = []
    for length in [int(x) for x in args.lengths.split(",")]:
        cases = {"n1": lambda: _run(engine, [prompt(length)], [0]),
                 "n4": lambda: _run(engine, [prompt(length)] * 4, [0, 1, 2, 3]),
                 "n4_apart": lambda: _run(engine, [prompt(length) for _ in range(4)], [0, 1, 2, 3])}
        times: dict[str, list[float]] = {k: [] for k in cases}
        tokens: dict[str, int] = {}
        names = list(cases)
        for r in range(args.rounds):
            for name in names[r % 3:] + names[:r % 3]:
                seconds, computed = cases[name]()
                times[name].append(seconds)
                tokens[name] = computed
        med = {k: statistics.median(v) for k, v in times.items()}
        line = {"prompt_tokens": length, "dtype": str(engine.config.dtype).removeprefix("torch."),
                **{f"{k}_s": round(v, 4) for k, v in med.items()},
                **{f"{k}_computed_tokens": v for k, v in tokens.items()},
                "n4_over_n1": round(med["n4"] / med["n1"], 3), "n4_apart_over_n1": round(med["n4_apart"] / med["n1"], 3),
                "rounds": args.rounds}
        lines.append(line)
        print(json.dumps(line), flush=True)
    engine.check_integrity()
    print(json.dumps({"bench": "choices", "goal_n4_over_n1_max": 1.3,
                      **{f"n4_over_n1_at_{x['prompt_tokens']}": x["n4_over_n1"] for x in lines},
                      **{f"n4_apart_over_n1_at_{x['prompt_tokens']}": x["n4_apart_over_n1"] for x in lines}}))


if __name__ == "__main__":
    main()
