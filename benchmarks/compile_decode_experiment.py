"""Scratch experiment (issue 14 item 3a): does torch.compile of the pure-decode forward pay on the CPU?

The decode forward of `small` (bf16) is written as a pure function of (input_ids, positions,
slot rows, block tables, seq lens) at a fixed padded batch; the paged attention, the KV write and
the fused elementwise ops are opaque torch.library custom ops (dynamo does not trace into them),
the pre-packed oneDNN linears are traced as mkldnn._linear_pointwise. For each bucket it prints
the compile time (first call) and the eager vs compiled forward time (best of N, thread CPU time
on one thread, wall time with more), both measured in this process, interleaved.

    python benchmarks/compile_decode_experiment.py --buckets 1,8,32 --mode default
    python benchmarks/compile_decode_experiment.py --buckets 1 --cpp-wrapper

Measured (torch 2.13 CPU, `small` bf16, 512-token contexts, one Zen 4 thread, thread CPU time,
best of 3 x 30 alternating with the eager function in the same process):

    variant                       bucket  compile   eager    compiled   speedup
    custom ops, python wrapper       1     18.6 s   7.12 ms   7.05 ms    1.01
                                     8      5.0 s  15.21 ms  15.57 ms    0.98
    custom ops, cpp_wrapper          1     19.2 s   7.17 ms   7.19 ms    1.00
                                     8     16.1 s  15.28 ms  15.12 ms    1.01
    --native --freezing (inductor packs the weights, generates the elementwise kernels):
        does not lower in torch 2.13 (freezing mixes up graph arguments: "weight must be 2-D").
    mkldnn._linear_pointwise traced directly: inductor only lowers it on frozen (constant) weights.

Nothing to compile away: the step is 33 oneDNN calls, 8 attention calls and ~40 small fused
ops, each already one call; what inductor saves is the Python between them, which the eager
layer path no longer has much of. Dropped (see the report of issue 14 items 3-4).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from services.engine import attention_ops  # noqa: E402

_mod = attention_ops.load_kernels()


@torch.library.custom_op("tandem_exp::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    _mod.paged_decode_attention(out, q.contiguous(), k_cache, v_cache, block_tables, seq_lens, scale)
    return out


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale):
    return torch.empty_like(q)


@torch.library.custom_op("tandem_exp::kv_write", mutates_args=("kv",))
def kv_write(kv: torch.Tensor, rows: torch.Tensor, kv_new: torch.Tensor) -> None:
    """kv viewed as [rows_total, Hkv*D]; rows [2T]; kv_new [2T, Hkv*D]."""
    kv.index_copy_(0, rows, kv_new)


@kv_write.register_fake
def _(kv, rows, kv_new):
    return None


@torch.library.custom_op("tandem_exp::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _mod.rms_norm(out, x, w, eps)
    return out


@rms_norm.register_fake
def _(x, w, eps):
    return torch.empty_like(x)


@torch.library.custom_op("tandem_exp::add_rms_norm", mutates_args=("residual",))
def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(residual)
    _mod.add_rms_norm(out, residual, delta.contiguous(), w, eps)
    return out


@add_rms_norm.register_fake
def _(residual, delta, w, eps):
    return torch.empty_like(residual)


@torch.library.custom_op("tandem_exp::silu_mul", mutates_args=())
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _mod.silu_mul(out, gate_up)
    return out


@silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("tandem_exp::rope", mutates_args=())
def rope(qk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = qk.clone()
    _mod.rope_(out, positions, cos, sin)
    return out


@rope.register_fake
def _(qk, positions, cos, sin):
    return torch.empty_like(qk)


@torch.library.custom_op("tandem_exp::linear", mutates_args=())
def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@linear.register_fake
def _(x, packed, out_features):
    return x.new_empty(x.shape[0], out_features)


def make_decode_fn(model, cfg, kv):
    layers = model.layers
    packed = [(l.qkv_proj.packed, l.o_proj.packed, l.gate_up_proj.packed, l.down_proj.packed,
               l.input_layernorm.weight, l.post_attention_layernorm.weight) for l in layers]
    emb, norm_w, lm = model.embed_tokens.weight, model.norm.weight, model.lm_head.packed
    cos, sin = model.rotary.cos, model.rotary.sin
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps, scale = cfg.rms_norm_eps, D ** -0.5
    nl, bs = cfg.num_layers, kv.shape[3]
    outs = {id(l.packed): l.out_features for l in model.modules() if hasattr(l, "packed")}

    def lin(x, w, *_):
        return linear(x, w, outs[id(w)])
    kv_rows = kv.view(-1, Hkv * D)          # [NB * L * 2 * bs, Hkv*D]

    def forward(input_ids, positions, slot_rows, block_tables, seq_lens):
        """slot_rows: [L, 2T] rows of kv_rows for each layer's K then V."""
        t = input_ids.shape[0]
        x = torch.nn.functional.embedding(input_ids, emb)
        h = rms_norm(x, packed[0][4], eps)
        for i in range(nl):
            wqkv, wo, wgu, wd, _, w2 = packed[i]
            qkv = lin(h, wqkv, None, "none", [], "")
            qk = rope(qkv[:, :(H + Hkv) * D].view(t, H + Hkv, D), positions, cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + Hkv) * D:]
            kv_write(kv_rows, slot_rows[i], torch.cat([k.reshape(t, Hkv * D), v]))
            kvl = kv[:, i]
            a = paged_attention(q, kvl[:, 0], kvl[:, 1], block_tables, seq_lens, scale)
            o = lin(a.view(t, H * D), wo, None, "none", [], "")
            h2 = add_rms_norm(x, o, w2, eps)
            m = lin(silu_mul(lin(h2, wgu, None, "none", [], "")), wd, None, "none", [], "")
            nxt = packed[i + 1][4] if i + 1 < nl else norm_w
            h = add_rms_norm(x, m, nxt, eps)
        return lin(h, lm, None, "none", [], "")

    return forward


def make_native_fn(loaded, cfg, kv, dtype, cos, sin):
    """Plain torch ops (F.linear on row-major weights, torch RMSNorm/RoPE/SiLU): inductor packs the
    weights itself (freezing) and generates the elementwise kernels; attention and the KV write opaque."""
    T = {k: v.to(dtype) for k, v in loaded.tensors.items()}
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps, scale, nl = cfg.rms_norm_eps, D ** -0.5, cfg.num_layers
    F = torch.nn.functional
    W = []
    for i in range(nl):
        p = f"model.layers.{i}."
        W.append((torch.cat([T[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), T[p + "self_attn.o_proj.weight"],
                  torch.cat([T[p + "mlp.gate_proj.weight"], T[p + "mlp.up_proj.weight"]]), T[p + "mlp.down_proj.weight"],
                  T[p + "input_layernorm.weight"], T[p + "post_attention_layernorm.weight"]))
    emb, norm_w, lm = T["model.embed_tokens.weight"], T["model.norm.weight"], T["lm_head.weight"]
    kv_rows = kv.view(-1, Hkv * D)

    def norm(x, w):
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def rot(x, c, s_):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            def L(w):
                m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
                m.weight.data.copy_(w)
                return m
            self.lins = torch.nn.ModuleList(torch.nn.ModuleList([L(ws[0]), L(ws[1]), L(ws[2]), L(ws[3])]) for ws in W)
            for i, ws in enumerate(W):
                self.register_buffer(f"n{i}_1", ws[4].clone()); self.register_buffer(f"n{i}_2", ws[5].clone())
            self.register_buffer("emb", emb.clone()); self.register_buffer("norm_w", norm_w.clone()); self.lm = L(lm)

        def forward(self, input_ids, positions, slot_rows, block_tables, seq_lens):
            t = input_ids.shape[0]
            c = cos[positions].to(dtype).unsqueeze(1); s_ = sin[positions].to(dtype).unsqueeze(1)
            x = F.embedding(input_ids, self.emb)
            for i in range(nl):
                lq, lo, lg, ld = self.lins[i]
                w1, w2 = getattr(self, f"n{i}_1"), getattr(self, f"n{i}_2")
                qkv = lq(norm(x, w1))
                qk = rot(qkv[:, :(H + Hkv) * D].view(t, H + Hkv, D), c, s_)
                q, k = qk[:, :H], qk[:, H:]
                v = qkv[:, (H + Hkv) * D:]
                kv_write(kv_rows, slot_rows[i], torch.cat([k.reshape(t, Hkv * D), v]))
                kvl = kv[:, i]
                a = paged_attention(q, kvl[:, 0], kvl[:, 1], block_tables, seq_lens, scale)
                x = x + lo(a.reshape(t, H * D))
                g, u = lg(norm(x, w2)).chunk(2, dim=-1)
                x = x + ld(F.silu(g) * u)
            return self.lm(norm(x, self.norm_w))
    return M().eval()


def inputs_for(batch, ctx, cfg, kv, rng):
    nb, nl, _, bs = kv.shape[:4]
    blocks_per = (ctx + bs) // bs + 1
    tables = torch.randperm(nb - 1, generator=rng)[: batch * blocks_per].view(batch, blocks_per).to(torch.int32)
    positions = torch.full((batch,), ctx, dtype=torch.int64)
    seq_lens = positions.to(torch.int32) + 1
    blk = tables[:, ctx // bs].long()
    off = positions % bs
    layer = torch.arange(nl)[:, None, None]
    which = torch.arange(2)[None, :, None]
    rows = (((blk[None, None] * nl + layer) * 2 + which) * bs + off[None, None]).reshape(nl, 2 * batch)
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=rng)
    return ids, positions, rows, tables, seq_lens


def best(fn, n, clock):
    ts = []
    for _ in range(n):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return min(ts)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--buckets", default="1,8,32")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", default="default")
    p.add_argument("--cpp-wrapper", action="store_true")
    p.add_argument("--freezing", action="store_true")
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--native", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import torch._inductor.config as icfg
    icfg.cpp_wrapper = a.cpp_wrapper
    icfg.freezing = a.freezing
    from benchmarks.profile_decode import build
    engine = build("bfloat16", a.threads)
    runner = engine.runner
    model, cfg, kv = runner.model, engine.config.model, runner.kv
    fwd = make_decode_fn(model, cfg, kv)
    if a.native:
        from services.engine.loader import resolve_model
        fwd = make_native_fn(resolve_model("small"), cfg, kv, engine.config.dtype, model.rotary.cos, model.rotary.sin)
    rng = torch.Generator().manual_seed(0)
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    for b in map(int, a.buckets.split(",")):
        args = inputs_for(b, a.ctx, cfg, kv, rng)
        compiled = torch.compile(fwd, dynamic=False, mode=None if a.mode == "default" else a.mode, fullgraph=True)
        with torch.inference_mode():
            ref = fwd(*args)
            t0 = time.perf_counter()
            out = compiled(*args)
            compile_s = time.perf_counter() - t0
            diff = (out.float() - ref.float()).abs().max().item()
            same_argmax = bool((out.argmax(-1) == ref.argmax(-1)).all())
            eager_ms = compiled_ms = 1e9
            for _ in range(3):     # interleaved rounds
                eager_ms = min(eager_ms, best(lambda: fwd(*args), a.n, clock) * 1e3)
                compiled_ms = min(compiled_ms, best(lambda: compiled(*args), a.n, clock) * 1e3)
        print(json.dumps({"bucket": b, "ctx": a.ctx, "threads": a.threads, "mode": a.mode,
                          "cpp_wrapper": a.cpp_wrapper, "freezing": a.freezing, "native": a.native, "compile_s": round(compile_s, 1),
                          "eager_ms": round(eager_ms, 3), "compiled_ms": round(compiled_ms, 3),
                          "speedup": round(eager_ms / compiled_ms, 3), "max_abs_diff": diff,
                          "same_argmax": same_argmax}), flush=True)


if __name__ == "__main__":
    main()
