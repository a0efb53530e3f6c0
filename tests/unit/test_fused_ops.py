"""The fused CPU elementwise ops equal the torch ops they replace (bf16: bit for bit)."""
from __future__ import annotations

import pytest
import torch

from services.engine import attention_ops, fused_ops
from services.engine.loader import resolve_model
from services.engine.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(attention_ops.load_kernels() is None, reason="CPU kernel module unavailable")


@pytest.fixture
def unfused(monkeypatch):
    """Run a fused_ops function down its torch path."""
    def call(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(fused_ops, "_kernels", lambda x: None)
            return fn(*args)
    return call


def _close(a, b, dtype):
    if dtype == torch.bfloat16:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_norms_match_torch(unfused, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 200, generator=g).to(dtype)
    w = (torch.rand(200, generator=g) + 0.5).to(dtype)
    _close(fused_ops.rms_norm(x, w, 1e-5), unfused(fused_ops.rms_norm, x, w, 1e-5), dtype)
    delta = torch.randn(rows, 200, generator=g).to(dtype)
    r1, r2 = x.clone(), x.clone()
    out1 = fused_ops.add_rms_norm(r1, delta, w, 1e-5)
    out2 = unfused(fused_ops.add_rms_norm, r2, delta, w, 1e-5)
    assert torch.equal(r1, r2)                         # the residual add rounds the same way
    _close(out1, out2, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_silu_mul_matches_torch(unfused, dtype, rows):
    gate_up = (torch.randn(rows, 2 * 96) * 4).to(dtype)
    _close(fused_ops.silu_mul(gate_up), unfused(fused_ops.silu_mul, gate_up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1408, 96, 77, 5])
def test_silu_mul_kernel_is_bit_exact_on_every_variant(variant, dtype, width):
    """Each vector ISA build's SiLU-mul equals F.silu(g) * u bit for bit, float32 too (the scalar
    build: bf16), on strided rows whose width leaves a scalar tail after torch's vector span
    (96 = 64 + 32 bf16, 77, 5)."""
    name, mod = variant
    g = torch.Generator().manual_seed(width)
    gate_up = (torch.randn(64, 3 * width, generator=g) * 6).to(dtype)[:, :2 * width]   # rows strided
    out = torch.empty(64, width, dtype=dtype)
    mod.silu_mul(out, gate_up)
    ref = torch.nn.functional.silu(gate_up[:, :width]) * gate_up[:, width:]
    assert mod.silu_mul_vectorized == (name != "scalar")
    if name == "scalar" and dtype == torch.float32:     # std::exp, not torch's SLEEF exp: last bits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(out, ref), f"{name}: {(out != ref).sum().item()} of {ref.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_rope_matches_torch_on_strided_heads(unfused, dtype, rows):
    cfg = resolve_model("tiny").config
    rope = RotaryEmbedding(cfg)
    positions = torch.randint(0, cfg.max_position_embeddings, (rows,))
    heads, d = 6, cfg.head_dim
    qkv = torch.randn(rows, (heads + 2) * d).to(dtype)           # a fused projection: rows are strided
    a, b = qkv.clone(), qkv.clone()
    fused_ops.Rotary(positions, rope.cos, rope.sin).rotate_(a[:, :heads * d].view(rows, heads, d))
    unfused(fused_ops.Rotary(positions, rope.cos, rope.sin).rotate_, b[:, :heads * d].view(rows, heads, d))
    _close(a, b, dtype)
    assert torch.equal(a[:, heads * d:], qkv[:, heads * d:])      # nothing beyond the rotated heads moved


def test_rope_refuses_positions_past_the_table():
    rope = RotaryEmbedding(resolve_model("tiny").config)
    x = torch.randn(1, 2, rope.cos.shape[1] * 2)
    with pytest.raises(RuntimeError, match="out of range"):
        fused_ops.Rotary(torch.tensor([rope.cos.shape[0]]), rope.cos, rope.sin).rotate_(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_write_kv_rows_equals_index_put(unfused, dtype, tokens):
    """New tokens' K and V land in their rows as index_put_ puts them (from a strided fused view)."""
    g = torch.Generator().manual_seed(tokens)
    width = 48
    kv1 = torch.randn(300, width, generator=g).to(dtype)
    kv2 = kv1.clone()
    rows = torch.randperm(300, generator=g)[:2 * tokens].view(2, tokens)             # [2, T], distinct
    qkv = torch.randn(tokens, 64 + 2 * width, generator=g).to(dtype)
    new = qkv[:, 64:].view(tokens, 2, width)                                         # strided rows
    fused_ops.write_kv_rows(kv1, rows, new)
    unfused(fused_ops.write_kv_rows, kv2, rows, new)
    assert torch.equal(kv1, kv2)


def test_write_kv_rows_refuses_a_row_out_of_range():
    kv = torch.zeros(10, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        attention_ops.load_kernels().write_kv_rows(kv, torch.tensor([[1], [10]]), torch.zeros(1, 2, 8))


@pytest.mark.parametrize("rows", [1, 16, 40])
@pytest.mark.parametrize("vocab", [49152, 1000, 33])
def test_mask_tokens_equals_the_torch_path(unfused, rows, vocab):
    """Every disallowed token becomes -inf and nothing else changes: words all 0, all 1 and mixed,
    a vocabulary that ends mid-word, strided logits rows."""
    g = torch.Generator().manual_seed(rows * vocab)
    words = (vocab + 31) // 32
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, words), generator=g, dtype=torch.int32)
    kind = torch.randint(0, 3, (rows, words), generator=g)
    bits[kind == 0] = 0                                   # a whole word disallowed
    bits[kind == 1] = -1                                  # a whole word allowed
    wide = torch.randn(rows, vocab + 7, generator=g)
    logits = wide[:, :vocab]
    a, b = wide.clone()[:, :vocab], wide.clone()[:, :vocab]                # rows strided by vocab + 7
    assert a.stride(0) == vocab + 7
    fused_ops.mask_tokens_(a, bits)
    unfused(fused_ops.mask_tokens_, b, bits)
    assert torch.equal(a, b)
    allowed = (bits.view(torch.uint8).long().unsqueeze(-1) >> torch.arange(8)) & 1        # [rows, 4W, 8]
    allowed = allowed.view(rows, -1)[:, :vocab].bool()
    assert torch.equal(a[allowed], logits[allowed]) and bool((a[~allowed] == float("-inf")).all())


@pytest.mark.parametrize("vocab", [49152, 1000, 33])
def test_mask_tokens_kernel_is_exact_on_every_variant(variant, vocab):
    """Each ISA build (AVX-512 masked stores, AVX2 blends, scalar) leaves allowed logits untouched
    and sets every other one to -inf, on words all 0, all 1 and mixed, with a partial last word."""
    _, mod = variant
    g = torch.Generator().manual_seed(vocab)
    rows, words = 9, (vocab + 31) // 32
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, words), generator=g, dtype=torch.int32)
    kind = torch.randint(0, 3, (rows, words), generator=g)
    bits[kind == 0], bits[kind == 1] = 0, -1
    logits = torch.randn(rows, vocab, generator=g)
    out = logits.clone()
    mod.mask_tokens_(out, bits)
    allowed = ((bits.view(torch.uint8).long().unsqueeze(-1) >> torch.arange(8)) & 1).view(rows, -1)[:, :vocab].bool()
    assert torch.equal(out, torch.where(allowed, logits, torch.full_like(logits, float("-inf"))))


def test_mask_tokens_refuses_a_short_mask():
    with pytest.raises(RuntimeError, match="bits must be"):
        attention_ops.load_kernels().mask_tokens_(torch.zeros(2, 100), torch.zeros(2, 3, dtype=torch.int32))
