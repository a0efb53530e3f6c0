"""Where a decode step and a prefill go (issue 14 items 3-4): a scratch profiler for `small`.

For each (threads, batch, context): B requests of C random tokens are prefilled, then `--steps`
decode steps are timed one by one through LLMEngine.step (best and median of the steps are printed,
since other work shares this host). With --breakdown each step is split into its parts (scheduler,
build_inputs, model forward, sampler, update) by timing them in the same process.
With --prefill, one L-token prompt is timed to its first token (best of --repeats) and its
GFLOP/s (2 * params * L for the linears plus the causal attention's 2 * 2 * L^2/2 * H * D per
layer) is printed beside the host's measured bf16/fp32 matmul GFLOP/s.

    python benchmarks/profile_decode.py --threads 1,2 --batches 1,8,32 --contexts 512,2048
    python benchmarks/profile_decode.py --prefill 128,512,2048 --threads 1
    python benchmarks/profile_decode.py --torch-profile --threads 1 --batches 8 --contexts 512
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402


def build(dtype: str, threads: int, budget: int = 2048):
    from services.engine.builder import build_engine
    return build_engine("small", dtype=dtype, num_threads=threads, enable_prefix_caching=False,
                        max_num_batched_tokens=budget, max_model_len=4096, kv_memory_gib=2)


def params(max_tokens: int):
    from services.engine.sampling_params import SamplingParams
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def fill(engine, batch: int, context: int, steps: int, rng: random.Random) -> None:
    """Add `batch` requests of `context` tokens and step until every one is decoding."""
    vocab = engine.config.model.vocab_size
    for _ in range(batch):
        engine.add_request([rng.randrange(10, vocab - 1) for _ in range(context)], params(steps + 64))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()


def drain(engine) -> None:
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)


CLOCK = time.perf_counter


def time_decode(engine, batch: int, context: int, steps: int, rng: random.Random) -> list[float]:
    fill(engine, batch, context, steps, rng)
    times = []
    for _ in range(steps):
        t0 = CLOCK()
        engine.step()
        times.append(CLOCK() - t0)
    drain(engine)
    return times


def breakdown(engine, batch: int, context: int, steps: int, rng: random.Random) -> dict:
    """ms per part of a decode step (best over steps), parts timed inside one step."""
    fill(engine, batch, context, steps, rng)
    runner = engine.runner
    parts: dict[str, list[float]] = {k: [] for k in ("schedule", "build_inputs", "forward", "sample", "update", "total")}
    for _ in range(steps):
        t0 = CLOCK()
        out = engine.scheduler.schedule()
        t1 = CLOCK()
        inputs = runner.build_inputs(out)
        t2 = CLOCK()
        logits = runner.model(inputs.input_ids, inputs.positions, runner.kv, inputs.meta, inputs.logits_indices)
        t3 = CLOCK()
        chunks = out.decodes
        samples = runner.sampler(logits, [c.request.sampling_params for c in chunks],
                                 [c.request.num_output_tokens for c in chunks])
        t4 = CLOCK()
        engine.scheduler.update(out, {c.request.request_id: t for c, t in zip(chunks, samples.token_ids)})
        t5 = CLOCK()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
            parts[k].append(v)
    drain(engine)
    return {k: round(min(v) * 1e3, 3) for k, v in parts.items()} | {
        "total_median": round(statistics.median(parts["total"]) * 1e3, 3)}


def matmul_gflops(dtype: torch.dtype, threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul (the host's matmul peak as torch reaches it)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_t(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def linear_gflops(engine, tokens: int, repeats: int = 5) -> float:
    """GFLOP/s of the 33 pre-packed linears of a `tokens`-row prefill (the matmul part alone)."""
    m = engine.runner.model
    cfg = engine.config.model
    x = torch.randn(tokens, cfg.hidden_size).to(engine.config.dtype)
    xi = torch.randn(tokens, cfg.intermediate_size).to(engine.config.dtype)

    def run():
        for layer in m.layers:
            layer.qkv_proj(x)
            layer.o_proj(x)
            layer.gate_up_proj(x)
            layer.down_proj(xi)
        m.lm_head(x[-1:])
    run()
    best = min(_t(run) for _ in range(repeats))
    return 2 * linear_params(cfg) * tokens / best / 1e9, best * 1e3


def linear_params(cfg) -> int:
    per_layer = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size \
        + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer


def prefill_flops(cfg, tokens: int) -> float:
    """Linears (lm_head once, for the sampled row) + causal attention (QK^T and PV over half the square)."""
    attn = cfg.num_layers * 2 * 2 * cfg.num_heads * cfg.head_dim * tokens * (tokens + 1) / 2
    return 2 * linear_params(cfg) * tokens + 2 * cfg.vocab_size * cfg.hidden_size + attn


def _t(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def time_prefill(engine, length: int, repeats: int, rng: random.Random) -> float:
    vocab = engine.config.model.vocab_size
    best = None
    for _ in range(repeats):
        prompt = [rng.randrange(10, vocab - 1) for _ in range(length)]
        t0 = CLOCK()
        engine.generate([prompt], params(1))
        dt = CLOCK() - t0
        best = dt if best is None else min(best, dt)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--prefill", default="")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-profile", action="store_true")
    p.add_argument("--tag", default="")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: this thread's CPU time (one thread only): time other processes take is not counted")
    a = p.parse_args()
    global CLOCK
    CLOCK = time.thread_time if a.clock == "thread" else time.perf_counter
    rng = random.Random(0)
    for threads in map(int, a.threads.split(",")):
        if a.clock == "thread" and threads != 1:
            raise SystemExit("--clock thread measures one thread only")
        engine = build(a.dtype, threads)
        # warm-up: kernels loaded, oneDNN primitives created for the shapes below
        fill(engine, 2, 64, 4, rng)
        for _ in range(3):
            engine.step()
        drain(engine)
        if a.prefill:
            dt = engine.config.dtype
            peak = matmul_gflops(dt, threads)
            for length in map(int, a.prefill.split(",")):
                s = time_prefill(engine, length, a.repeats, rng)
                lin_gf, lin_ms = linear_gflops(engine, length)
                print(json.dumps({"tag": a.tag, "probe": "prefill", "threads": threads, "tokens": length,
                                  "ms": round(s * 1e3, 2),
                                  "gflops": round(prefill_flops(engine.config.model, length) / s / 1e9, 1),
                                  "linears_ms": round(lin_ms, 2), "linears_gflops": round(lin_gf, 1),
                                  "matmul_peak_gflops": round(peak, 1)}), flush=True)
        for context in map(int, a.contexts.split(",")) if not a.prefill else ():
            for batch in map(int, a.batches.split(",")):
                if a.torch_profile:
                    fill(engine, batch, context, a.steps, rng)
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        for _ in range(a.steps):
                            engine.step()
                    drain(engine)
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
                    continue
                if a.breakdown:
                    r = breakdown(engine, batch, context, a.steps, rng)
                    print(json.dumps({"tag": a.tag, "threads": threads, "batch": batch, "context": context, **r}),
                          flush=True)
                    continue
                ts = time_decode(engine, batch, context, a.steps, rng)
                print(json.dumps({"tag": a.tag, "probe": "decode", "threads": threads, "batch": batch,
                                  "context": context, "best_ms": round(min(ts) * 1e3, 3),
                                  "median_ms": round(statistics.median(ts) * 1e3, 3)}), flush=True)


if __name__ == "__main__":
    from services.allocator import use_tcmalloc
    use_tcmalloc()          # the allocator a worker runs (vLLM's CPU build runs under tcmalloc too)
    main()
