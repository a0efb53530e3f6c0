"""Scratch A/B of the model forward in ONE process: a base checkout's model.py against this one's.

Both models get the same `small` weights (pre-packed the same way), the same KV tensor and the
same step inputs (B decodes of C-token contexts, each request's blocks in a contiguous run, as a
fresh engine allocates them; or one L-token prefill). Rounds alternate between the two and each
keeps its best; with one thread the clock is the thread's CPU time (other processes' time on the
shared cores is not counted), with more it is wall time.

    python benchmarks/ab_forward.py --base /tmp/tperf-base --threads 1 --batches 1,8,32 --contexts 512
    python benchmarks/ab_forward.py --base /tmp/tperf-base --threads 1 --prefill 512,2048
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from services.engine.linear import prepack_linears  # noqa: E402
from services.engine.loader import resolve_model  # noqa: E402


def load_model_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def make_model(mod, loaded, dtype):
    cfg = loaded.config
    with torch.device("meta"):
        m = mod.LlamaModel(cfg)
    m = m.to(dtype).to_empty(device="cpu")
    m.load_hf_weights(loaded.tensors)
    prepack_linears(m)
    m.init_rotary("cpu")
    return m.eval()


def decode_inputs(mod, cfg, batch: int, context: int, bs: int, seed: int = 0):
    blocks_per = context // bs + 1
    tables = torch.arange(batch * blocks_per, dtype=torch.int32).view(batch, blocks_per)
    positions = torch.full((batch,), context, dtype=torch.long)
    meta = mod.AttentionMetadata(
        slot_blocks=tables[:, context // bs].long(), slot_offsets=positions % bs, num_decode=batch,
        decode_block_tables=tables, decode_seq_lens=(positions + 1).to(torch.int32), prefills=[],
        decode_max_len=context + 1)
    ids = torch.randint(10, cfg.vocab_size, (batch,), generator=torch.Generator().manual_seed(seed))
    return ids, positions, meta, torch.arange(batch)


def prefill_inputs(mod, cfg, length: int, bs: int):
    nblk = -(-length // bs)
    table = torch.arange(nblk)
    pos = torch.arange(length)
    meta = mod.AttentionMetadata(
        slot_blocks=table[pos // bs], slot_offsets=pos % bs, num_decode=0,
        decode_block_tables=torch.zeros(0, 0, dtype=torch.int32), decode_seq_lens=torch.zeros(0, dtype=torch.int32),
        prefills=[mod.PrefillSeq(0, length, length, table)], decode_max_len=0)
    ids = torch.randint(10, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    return ids, pos, meta, torch.tensor([length - 1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="checkout whose services/engine/model.py is the baseline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="512")
    p.add_argument("--prefill", default="")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    dtype = getattr(torch, a.dtype)
    loaded = resolve_model("small")
    cfg = loaded.config
    mods = {"base": load_model_module(os.path.join(a.base, "services/engine/model.py"), "base_model"),
            "new": load_model_module(os.path.join(os.path.dirname(HERE), "services/engine/model.py"), "new_model")}
    models = {k: make_model(m, loaded, dtype) for k, m in mods.items()}
    bs = 16
    cases = []
    if a.prefill:
        cases = [("prefill", n, None) for n in map(int, a.prefill.split(","))]
    else:
        cases = [("decode", b, c) for c in map(int, a.contexts.split(",")) for b in map(int, a.batches.split(","))]
    for kind, n, ctx in cases:
        need = (n * (ctx // bs + 1)) if kind == "decode" else -(-n // bs)
        kv = torch.zeros(need + 1, cfg.num_layers, 2, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
        kv.normal_()
        args = {k: (decode_inputs(m, cfg, n, ctx, bs) if kind == "decode" else prefill_inputs(m, cfg, n, bs))
                for k, m in mods.items()}
        outs = {}
        for k, m in models.items():
            ids, pos, meta, li = args[k]
            outs[k] = m(ids, pos, kv, meta, li)
        same = torch.equal(outs["base"], outs["new"])
        diff = (outs["base"].float() - outs["new"].float()).abs().max().item()
        best = {k: float("inf") for k in models}
        reps = a.n if kind == "decode" else max(1, a.n // 5)
        for _ in range(a.rounds):
            for k, m in models.items():
                ids, pos, meta, li = args[k]
                for _ in range(reps):
                    t0 = clock()
                    m(ids, pos, kv, meta, li)
                    best[k] = min(best[k], clock() - t0)
        print(json.dumps({"probe": kind, "threads": a.threads, "dtype": a.dtype, "n": n, "context": ctx,
                          "base_ms": round(best["base"] * 1e3, 3), "new_ms": round(best["new"] * 1e3, 3),
                          "speedup": round(best["base"] / best["new"], 3), "bit_identical": same,
                          "max_abs_diff": diff}), flush=True)


if __name__ == "__main__":
    main()
