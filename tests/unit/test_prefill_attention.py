"""The tiled causal prefill attention equals SDPA with an explicit causal mask."""
import pytest
import torch
import torch.nn.functional as F

from services.engine import prefill_attention as pa

torch.set_num_threads(1)


def reference(q, k, v, scale):
    """float32 SDPA: query i (position ctx - q_len + i) sees keys 0 .. its position."""
    q_len, ctx = q.shape[0], k.shape[0]
    mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - q_len, ctx)[:, None]
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None],
                                         v.float().transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def qkv(q_len, ctx, heads, kv_heads, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(q_len, heads, d, generator=g), torch.randn(ctx, kv_heads, d, generator=g),
            torch.randn(ctx, kv_heads, d, generator=g))


# whole prompts and chunks after a cached prefix; tiles split mid-chunk; GQA 8/2 and 6/3; one query
@pytest.mark.parametrize("q_len,ctx,heads,kv_heads", [
    (300, 300, 8, 8), (512, 512, 4, 2), (37, 500, 8, 2), (130, 130, 6, 3), (1, 700, 8, 8), (64, 1000, 8, 8)])
def test_tiled_equals_sdpa(q_len, ctx, heads, kv_heads):
    q, k, v = qkv(q_len, ctx, heads, kv_heads)
    ref = reference(q, k, v, 0.125)
    out = pa.tiled_causal_attention(q, k, v, 0.125)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    # bf16: float32 scores, probabilities rounded to bf16 for P @ V (as torch's flash kernel does)
    out16 = pa.tiled_causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125),
                               atol=3e-2, rtol=2e-2)


def test_strided_inputs_as_the_model_passes_them():
    """q, k, v are views of one fused [T, q + 2kv] projection (row stride larger than H * D)."""
    t, h, d = 260, 4, 32
    fused = torch.randn(t, 3 * h * d).bfloat16()
    q, k, v = (fused[:, i * h * d:(i + 1) * h * d].view(t, h, d) for i in range(3))
    torch.testing.assert_close(pa.tiled_causal_attention(q, k, v, d ** -0.5),
                               pa.tiled_causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), d ** -0.5),
                               atol=0, rtol=0)


def test_prefill_attention_takes_the_tiled_path_only_where_it_was_faster():
    lo, hi = pa.TILED_CONTEXTS
    bf = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    assert pa.use_tiled(bf, lo) and pa.use_tiled(bf, hi)
    assert not pa.use_tiled(bf, lo - 1) and not pa.use_tiled(bf, hi + 1)
    assert not pa.use_tiled(bf.float(), 512)            # float32 keeps torch's flash kernel


@pytest.mark.parametrize("q_len,ctx", [(512, 512), (100, 400), (300, 300), (16, 2000)])
def test_prefill_attention_either_path_matches_the_reference(q_len, ctx):
    q, k, v = (x.bfloat16() for x in qkv(q_len, ctx, 8, 2))
    out = pa.prefill_attention(q, k, v, 0.125)
    torch.testing.assert_close(out.float(), reference(q, k, v, 0.125), atol=3e-2, rtol=2e-2)


def fused_views(t, h, hkv, d, seed=0):
    """q [t, h, d], k and v [t, hkv, d] in bf16: views of one fused [t, (h + 2 hkv) d] projection, as
    the model passes them (row stride larger than the heads)."""
    fused = torch.randn(t, (h + 2 * hkv) * d, generator=torch.Generator().manual_seed(seed)).bfloat16()
    return (fused[:, :h * d].view(t, h, d), fused[:, h * d:(h + hkv) * d].view(t, hkv, d),
            fused[:, (h + hkv) * d:].view(t, hkv, d))


def on_threads(mod, threads, q, k, v):
    """The kernel's output for (q, k, v) run on `threads` torch threads (then back to one)."""
    torch.set_num_threads(threads)
    try:
        out = torch.empty_like(q)
        mod.prefill_attention(out, q, k, v, q.shape[-1] ** -0.5)
        return out
    finally:
        torch.set_num_threads(1)


def _bf16_module():
    from services.engine import attention_ops
    if "avx512_bf16" not in {v.name for v in attention_ops.runnable_variants(attention_ops.cpu_flags())}:
        pytest.skip("this CPU has no AVX512-BF16: the C++ prefill kernel is not built for it")
    mod = attention_ops.load_kernels("avx512_bf16")
    if mod is None:
        pytest.skip("the avx512_bf16 kernel module did not build here")
    return mod


# whole prompts, chunks after a cached prefix, GQA 8/2, 6/3 and 9/3 (SmolLM2), D 64 and 128, context
# lengths that are not multiples of the kernel's 16/32-key blocks, one query, one key
@pytest.mark.parametrize("q_len,ctx,heads,kv_heads,d", [
    (300, 300, 8, 8, 64), (512, 512, 4, 2, 64), (37, 500, 8, 2, 64), (130, 130, 6, 3, 64), (1, 700, 8, 8, 64),
    (64, 1000, 8, 8, 128), (5, 5, 9, 3, 64), (17, 33, 2, 1, 128), (1, 1, 8, 8, 64), (97, 2100, 8, 8, 64)])
def test_bf16_kernel_matches_the_float32_reference(q_len, ctx, heads, kv_heads, d):
    mod = _bf16_module()
    q, k, v = (x.bfloat16() for x in qkv(q_len, ctx, heads, kv_heads, d=d))
    out = torch.full_like(q, float("nan"))
    mod.prefill_attention(out, q, k, v, d ** -0.5)
    ref = reference(q, k, v, d ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)
    # no worse than the tiled path (float32 scores, bf16 P.V) against the same reference
    tiled = pa.tiled_causal_attention(q, k, v, d ** -0.5).float()
    assert (out.float() - ref).abs().max() <= 1.5 * (tiled - ref).abs().max() + 1e-3


def test_bf16_kernel_takes_the_model_s_strided_views_and_any_thread_count():
    """q, k, v are views of one fused [T, q + 2kv] projection; results do not depend on threads."""
    mod = _bf16_module()
    t, h, hkv, d = 200, 8, 2, 64
    q, k, v = fused_views(t, h, hkv, d)
    outs = [on_threads(mod, threads, q, k, v) for threads in (1, 2)]
    contiguous = torch.empty(t, h, d, dtype=torch.bfloat16)
    mod.prefill_attention(contiguous, q.contiguous(), k.contiguous(), v.contiguous(), d ** -0.5)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], contiguous, atol=0, rtol=0)


def test_bf16_kernel_refuses_what_it_cannot_compute():
    mod = _bf16_module()
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    kv = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head_dim"):
        mod.prefill_attention(torch.empty(4, 2, 48, dtype=torch.bfloat16), q[..., :48], kv[..., :48], kv[..., :48], 1.0)
    with pytest.raises(RuntimeError, match="more queries"):
        mod.prefill_attention(torch.empty(4, 2, 64, dtype=torch.bfloat16), q, kv[:3], kv[:3], 1.0)
    with pytest.raises(RuntimeError, match="bfloat16"):
        mod.prefill_attention(q.float(), q.float(), kv.float(), kv.float(), 1.0)


def test_prefill_attention_uses_the_kernel_where_it_is_built():
    _bf16_module()
    q = torch.zeros(8, 2, 64, dtype=torch.bfloat16)
    assert pa.bf16_kernel(q, q, q) is not None
    assert pa.bf16_kernel(q.float(), q.float(), q.float()) is None                # float32: torch's paths
    odd = torch.zeros(8, 2, 48, dtype=torch.bfloat16)
    assert pa.bf16_kernel(odd, odd, odd) is None                                  # head_dim 48: not built


def _amx_module():
    mod = _bf16_module()
    if not mod.prefill_attention_amx:
        pytest.skip("this CPU has no AMX-BF16 (or Linux did not grant the tile state): the kernel uses vdpbf16ps")
    return mod


# D 64 and 128 (the second takes two passes of four output tiles), GQA, rows not a multiple of the
# 16-row tiles, contexts not multiples of the 32-key tiles, one query, a chunk after a long prefix
@pytest.mark.parametrize("q_len,ctx,heads,kv_heads,d", [
    (300, 300, 8, 8, 64), (37, 500, 8, 2, 64), (130, 130, 6, 3, 64), (1, 700, 8, 8, 64), (64, 1000, 8, 8, 128),
    (5, 5, 9, 3, 64), (17, 33, 2, 1, 128), (1, 1, 8, 8, 64), (97, 2100, 8, 8, 64)])
def test_amx_tiles_match_the_vdpbf16ps_path_and_the_reference(q_len, ctx, heads, kv_heads, d):
    mod = _amx_module()
    q, k, v = (x.bfloat16() for x in qkv(q_len, ctx, heads, kv_heads, d=d, seed=3))
    amx, vec = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    mod.prefill_attention(amx, q, k, v, d ** -0.5, use_amx=True)
    mod.prefill_attention(vec, q, k, v, d ** -0.5, use_amx=False)
    ref = reference(q, k, v, d ** -0.5)
    assert not amx.isnan().any()
    torch.testing.assert_close(amx.float(), ref, atol=3e-2, rtol=2e-2)
    # the same bf16 products summed in float32 in another order: within one bf16 rounding of each other
    torch.testing.assert_close(amx.float(), vec.float(), atol=8e-3, rtol=8e-3)


def test_amx_path_on_worker_threads_and_strided_views():
    """Every OpenMP thread configures its own tiles; the model's strided q/k/v views work."""
    mod = _amx_module()
    t, h, hkv, d = 333, 8, 2, 64
    q, k, v = fused_views(t, h, hkv, d, seed=5)
    outs = [on_threads(mod, threads, q, k, v) for threads in (1, 2)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0].float(), reference(q, k, v, d ** -0.5), atol=3e-2, rtol=2e-2)
