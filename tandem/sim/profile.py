"""`tandem profile`: measure the engine on this host and fit the simulator's cost model.

Runs the real engine (services.engine) in this process on `threads` torch threads (default 1: a
`tandem up --pin-cores` worker's share of a core) with prefix caching off:
- prefill: one step over k prompts of l tokens (max_tokens=1), median of `repeats`;
- decode: B requests adopted with C-token contexts (KV reserved as a decode instance does, no
  prefill needed), median step time over a few decode-only steps;
- mixed: B decodes plus one prompt in the same step (not fitted: the mixed-step rule's check);
- KV transfer: bytes through a loopback TCP socket (sendall / recv_into, as the tcp transport
  frames raw tensor memory; bench-transfer measures the transport itself against this);
- migration stage: the transfer's fixed cost (one stage = latency + bytes / bandwidth).
Then fits costmodel's forms and reports each fit's error and each term's share.
"""
from __future__ import annotations

import socket
import statistics
import threading
import time

from services.engine.blocks import cdiv
from tandem.sim.costmodel import CostModel, Profile, fit_decode, fit_prefill, fit_transfer

PREFILL_SHAPES = [(1, 16), (1, 64), (1, 128), (1, 256), (1, 384), (1, 512), (1, 768), (1, 1024), (1, 1536),
                  (2, 128), (4, 64), (8, 32), (2, 384), (4, 256), (3, 512)]
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DECODE_CONTEXTS = (64, 256, 1024)
MIXED_SHAPES = [(4, 256, 128), (8, 256, 256), (16, 512, 64), (2, 1024, 512)]   # (decodes, context, prompt)
TRANSFER_BYTES = (1 << 16, 1 << 20, 4 << 20, 16 << 20)


def _prompt(rng, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab - 1) for _ in range(n)]


def measure_engine(model: str, *, dtype: str = "auto", device: str = "cpu", threads: int | None = 1,
                   repeats: int = 3, log=print) -> dict:
    import random

    import torch

    from services.engine.builder import build_engine
    from services.engine.sampling_params import SamplingParams
    engine = build_engine(model, dtype=dtype, device=device, num_threads=threads, max_num_batched_tokens=8192,
                          max_num_seqs=512, enable_prefix_caching=False, kv_memory_gib=1.0)
    vocab = engine.config.model.vocab_size
    rng = random.Random(0)
    one = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    long = SamplingParams(max_tokens=1 << 20, ignore_eos=True, detokenize=False)
    ids = iter(range(1 << 30))

    def prefill_step(k: int, length: int) -> float:
        for _ in range(k):
            engine.add_request(_prompt(rng, length, vocab), one, request_id=f"p{next(ids)}")
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        while engine.has_unfinished():
            engine.step()
        return dt

    def adopt(batch: int, context: int) -> list[str]:
        rids = []
        for _ in range(batch):
            rid = f"d{next(ids)}"
            engine.reserve(rid, context + 1)
            engine.adopt(rid, _prompt(rng, context, vocab), [11], long)
            rids.append(rid)
        return rids

    def decode_steps(batch: int, context: int, steps: int = 4) -> float:
        rids = adopt(batch, context)
        engine.step()                                    # first step: warm
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        for rid in rids:
            engine.abort_request(rid)
        return statistics.median(times)

    prefill_step(1, 64)
    decode_steps(4, 64)                                  # warm kernels and allocator
    out = {"model": engine.config.model.model_id, "dtype": str(engine.config.dtype).removeprefix("torch."),
           "block_size": engine.config.cache.block_size, "num_blocks": engine.kv.num_blocks,
           "num_layers": engine.config.model.num_layers, "kv_bytes_per_block": engine.config.kv_bytes_per_block(),
           "threads": threads or torch.get_num_threads(), "prefill": [], "decode": [], "mixed": []}
    for k, length in PREFILL_SHAPES:
        t = statistics.median(prefill_step(k, length) for _ in range(repeats))
        out["prefill"].append({"prompts": k, "tokens": length, "s": t})
        log(f"prefill {k} x {length}: {t * 1e3:.1f} ms")
    for b in DECODE_BATCHES:
        for c in DECODE_CONTEXTS:
            if b * cdiv(c + 8, engine.kv.block_size) > engine.kv.num_blocks:
                continue                                 # does not fit the KV cache
            t = decode_steps(b, c)
            # contexts during the timed steps: prompt + 1 output + warm step + half the timed ones
            out["decode"].append({"batch": b, "context": c, "total_context": b * (c + 4), "s": t})
            log(f"decode batch {b} x context {c}: {t * 1e3:.2f} ms/step")
    for b, c, length in MIXED_SHAPES:
        rids = adopt(b, c)
        engine.step()
        engine.add_request(_prompt(rng, length, vocab), one, request_id=f"m{next(ids)}")
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        for rid in rids:
            engine.abort_request(rid)
        while engine.has_unfinished():
            engine.step()
        out["mixed"].append({"batch": b, "context": c, "total_context": b * (c + 2), "prompt": length, "s": dt})
        log(f"mixed {b} decodes x {c} + prompt {length}: {dt * 1e3:.1f} ms")
    engine.check_integrity()
    return out


def measure_transfer(repeats: int = 3) -> list[dict]:
    """(bytes, seconds) of loopback TCP sends, a receiver thread reading into a preallocated buffer
    and answering one byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    for s in (cli, conn):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    biggest = max(TRANSFER_BYTES)
    rbuf, sbuf = bytearray(biggest), bytes(biggest)
    plan = [n for n in TRANSFER_BYTES for _ in range(repeats + 1)]

    def receive():
        view = memoryview(rbuf)
        for n in plan:
            got = 0
            while got < n:
                got += conn.recv_into(view[got:n])
            conn.sendall(b"k")
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    times: dict[int, list[float]] = {}
    try:
        for n in plan:
            t0 = time.perf_counter()
            cli.sendall(memoryview(sbuf)[:n])
            cli.recv(1)
            times.setdefault(n, []).append(time.perf_counter() - t0)
    finally:
        t.join(timeout=10)
        for s in (cli, conn, srv):
            s.close()
    return [{"bytes": n, "s": statistics.median(ts[1:])} for n, ts in times.items()]


def build_profile(m: dict, transfer: list[dict], host: dict) -> Profile:
    pre_coef, pre_err = fit_prefill([([(s["tokens"], 0)] * s["prompts"], s["s"]) for s in m["prefill"]])
    dec_coef, dec_err = fit_decode([(s["batch"], s["total_context"], s["s"]) for s in m["decode"]])
    lat, bw = fit_transfer([(s["bytes"], s["s"]) for s in transfer])
    cost = CostModel(prefill=pre_coef, decode=dec_coef, transfer_latency_s=lat, transfer_bytes_per_s=bw,
                     migration_stage_s=lat, kv_bytes_per_block=m["kv_bytes_per_block"])
    mixed = [abs(cost.step_s([(s["prompt"], 0)], s["batch"], s["total_context"]) - s["s"]) / s["s"]
             for s in m["mixed"]]
    fit = {"prefill": pre_err, "decode": dec_err,
           "mixed_step_check": {"mean_rel_error": statistics.fmean(mixed) if mixed else None,
                                "max_rel_error": max(mixed, default=None), "points": len(mixed)},
           "transfer": {"latency_s": lat, "gbps": bw * 8 / 1e9, "path": "loopback TCP socket"}}
    return Profile(cost=cost, model=m["model"], dtype=m["dtype"], block_size=m["block_size"],
                   num_blocks=m["num_blocks"], threads=m["threads"], num_layers=m["num_layers"], host=host,
                   fit=fit, samples={"prefill": m["prefill"], "decode": m["decode"], "mixed": m["mixed"],
                                     "transfer": transfer})


def fit_table(profile: Profile) -> str:
    """Lines stating each fitted term, its share of the time and the fit's error without it."""
    lines = []
    for phase in ("prefill", "decode"):
        f = profile.fit[phase]
        lines.append(f"{phase}: mean rel error {f['mean_rel_error']:.1%}, max {f['max_rel_error']:.1%} "
                     f"over {f['points']} points")
        for name, t in f["terms"].items():
            lines.append(f"  {name:<12} {t['coef']:.4g}  share {t['share_of_time']:.1%}  "
                         f"error without it {t['mean_rel_error_without']:.1%}")
    m = profile.fit["mixed_step_check"]
    if m["points"]:
        lines.append(f"mixed steps (not fitted): mean rel error {m['mean_rel_error']:.1%}, max {m['max_rel_error']:.1%}")
    t = profile.fit["transfer"]
    lines.append(f"KV transfer ({t['path']}): {t['latency_s'] * 1e3:.3f} ms + bytes at {t['gbps']:.2f} Gbit/s")
    return "\n".join(lines)
