"""Paged decode attention: C++ kernel (every ISA variant this host runs) vs pure-torch reference vs
a naive per-row loop; the variant chooser and the build-failure fallbacks."""
from __future__ import annotations

import logging
import math
import random
import types

import pytest
import torch

from services.engine import attention_ops
from services.engine.attention_ops import (VARIANTS, KernelLoader, KernelVariant, choose_variant,
                                           paged_decode_attention_reference, runnable_variants)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_case(seq_lens, *, heads=8, kv_heads=8, head_dim=64, block_size=16, dtype=torch.float32,
              num_layers=3, layer=1, extra_pad_blocks=2, q_scale=1.0, seed=0):
    """Random paged K/V as strided views of a [nb, NL, 2, bs, Hkv, D] cache.

    Slots past each row's seq_len and every block not owned by a row hold NaN/inf garbage;
    block_tables padding points at garbage blocks or is out of range, and must never be read.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    needed = [(n + block_size - 1) // block_size for n in seq_lens]
    max_blocks = max(needed, default=0) + extra_pad_blocks
    n_garbage = 4
    num_blocks = sum(needed) + n_garbage
    cache = torch.randn(num_blocks, num_layers, 2, block_size, kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    owned, garbage = perm[: sum(needed)], perm[sum(needed):]
    cache[garbage] = float("nan")
    cache[garbage[0], :, :, 0] = float("inf")
    block_tables = torch.empty(B, max_blocks, dtype=torch.int32)
    pos = 0
    for b, (n, nb) in enumerate(zip(seq_lens, needed)):
        ids = owned[pos: pos + nb]
        pos += nb
        pad = [garbage[(b + j) % n_garbage] for j in range(max_blocks - nb)]
        if len(pad) >= 2:
            pad[-1] = -1 if b % 2 else num_blocks + 1000  # out of range: reading it would fault / be caught
        block_tables[b] = torch.tensor(ids + pad, dtype=torch.int32)
        if nb and n % block_size:
            cache[ids[-1], layer, :, n % block_size:] = float("nan")  # stale slots after the last token
    cache = cache.to(dtype)
    k_cache, v_cache = cache[:, layer, 0], cache[:, layer, 1]
    q = (torch.randn(B, heads, head_dim, generator=g) * q_scale).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


def naive_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Per-row, per-head loop in float64: the independent oracle for the reference."""
    B, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = H // Hkv
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        toks = [(int(block_tables[b, t // bs]), t % bs) for t in range(n)]
        k = torch.stack([k_cache[blk, off] for blk, off in toks]).double()  # [n, Hkv, D]
        v = torch.stack([v_cache[blk, off] for blk, off in toks]).double()
        for h in range(H):
            s = (k[:, h // G] @ q[b, h].double()) * scale
            p = torch.softmax(s, dim=0)
            out[b, h] = p @ v[:, h // G]
    return out


CONFIGS = [
    # (seq_lens, block_size): single token, block-exact, ragged, one past a boundary
    ([1], 16),
    ([16, 32, 48], 16),
    ([1, 17, 5, 64, 33, 0, 40], 16),
    ([8, 9, 1, 24, 7], 8),
    ([50, 3, 16, 23], 8),
]


@pytest.fixture(scope="module")
def kernels():
    mod = attention_ops.load_kernels()
    if mod is None:
        pytest.skip("CPU attention kernel unavailable (TANDEM_DISABLE_KERNELS set or build failed; see log)")
    return mod


def run_kernel(fn, q, k_cache, v_cache, block_tables, seq_lens, scale):
    out = torch.empty_like(q)
    fn(out, q, k_cache, v_cache, block_tables, seq_lens, scale)
    return out


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("seq_lens,block_size", CONFIGS)
def test_reference_matches_naive(dtype, group, seq_lens, block_size):
    kv_heads, head_dim = 2, 32
    args = make_case(seq_lens, heads=kv_heads * group, kv_heads=kv_heads, head_dim=head_dim,
                     block_size=block_size, dtype=dtype)
    scale = head_dim ** -0.5
    out = paged_decode_attention_reference(*args, scale)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert torch.isfinite(out).all()
    assert_close(out, naive_attention(*args, scale), dtype)


def test_reference_zero_length_rows_are_zero():
    args = make_case([0, 5, 0], heads=4, kv_heads=2, head_dim=16)
    out = paged_decode_attention_reference(*args, 0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert_close(out, naive_attention(*args, 0.25), torch.float32)


def test_reference_all_zero_batch():
    args = make_case([0, 0], heads=2, kv_heads=2, head_dim=8)
    assert torch.equal(paged_decode_attention_reference(*args, 0.5), torch.zeros(2, 2, 8))


def test_fallback_when_kernels_disabled(monkeypatch):
    monkeypatch.setenv("TANDEM_DISABLE_KERNELS", "1")
    build = FakeBuild(failing=())
    monkeypatch.setattr(attention_ops, "_loader", KernelLoader(build=build))  # a fresh process's loader
    assert attention_ops.load_kernels() is None and attention_ops.load_kernels("scalar") is None
    args = make_case([3, 20], heads=4, kv_heads=2, head_dim=16)
    out = attention_ops.paged_decode_attention(*args, 0.25)
    assert torch.equal(out, paged_decode_attention_reference(*args, 0.25))
    assert build.calls == []


def test_disable_env_is_read_once_not_per_call(monkeypatch):
    # paged_decode_attention and the fused ops look the module up ~40 times per decode step.
    monkeypatch.delenv("TANDEM_DISABLE_KERNELS", raising=False)
    loader = KernelLoader(flags=frozenset(ZEN2.split()), build=FakeBuild(failing=()))
    monkeypatch.setattr(attention_ops, "_loader", loader)
    mod = attention_ops.load_kernels()
    assert mod.simd == "avx2"
    monkeypatch.setenv("TANDEM_DISABLE_KERNELS", "1")  # too late: the choice is made
    reads = []
    real_get = attention_ops.os.environ.get
    monkeypatch.setattr(attention_ops.os.environ, "get", lambda *a: reads.append(a[0]) or real_get(*a))
    looked_up = [attention_ops.load_kernels() for _ in range(40)]
    monkeypatch.undo()
    assert all(m is mod for m in looked_up)
    assert reads == []


# --------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("seq_lens,block_size", CONFIGS)
def test_kernel_matches_reference(kernels, dtype, group, seq_lens, block_size):
    kv_heads, head_dim = 2, 64
    args = make_case(seq_lens, heads=kv_heads * group, kv_heads=kv_heads, head_dim=head_dim,
                     block_size=block_size, dtype=dtype, seed=group * 100 + block_size)
    k_cache = args[1]
    assert k_cache.stride(0) != k_cache[0].numel() and not k_cache.is_contiguous()  # a real strided view
    scale = head_dim ** -0.5
    ref = paged_decode_attention_reference(*args, scale)
    out = run_kernel(kernels.paged_decode_attention, *args, scale)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert_close(out, ref, dtype)
    scalar = run_kernel(kernels.paged_decode_attention_scalar, *args, scale)
    assert_close(scalar, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 32, 40, 96, 128, 256])
@pytest.mark.parametrize("group", [3, 8, 12])
def test_kernel_head_dims_and_group_tiles(kernels, dtype, head_dim, group):
    # Covers the generic (runtime head_dim, masked tail) and interleaved-bf16 paths and head tiling.
    args = make_case([1, 19, 40], heads=group, kv_heads=1, head_dim=head_dim, block_size=16, dtype=dtype,
                     seed=head_dim + group)
    scale = 1.0 / math.sqrt(head_dim)
    ref = paged_decode_attention_reference(*args, scale)
    assert_close(run_kernel(kernels.paged_decode_attention, *args, scale), ref, dtype)
    assert_close(run_kernel(kernels.paged_decode_attention_scalar, *args, scale), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_long_context_peaked_softmax(kernels, dtype):
    # Large logits (|s| ~ 100s) stress the max subtraction; odd block size 24 gives chunks of 16 + 8.
    args = make_case([1000, 517, 24], heads=8, kv_heads=2, head_dim=64, block_size=24, dtype=dtype,
                     q_scale=30.0, seed=7)
    ref = paged_decode_attention_reference(*args, 0.125)
    assert_close(run_kernel(kernels.paged_decode_attention, *args, 0.125), ref, dtype)


def test_kernel_zero_length_rows(kernels):
    args = make_case([0, 9, 0, 16], heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    out = run_kernel(kernels.paged_decode_attention, *args, 0.125)
    assert torch.equal(out[0].float(), torch.zeros(4, 64)) and torch.equal(out[2].float(), torch.zeros(4, 64))
    assert_close(out, paged_decode_attention_reference(*args, 0.125), torch.bfloat16)


def test_kernel_thread_count_invariant(kernels):
    args = make_case([1, 17, 5, 64, 33, 40, 2, 100], heads=8, kv_heads=4, head_dim=64, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_kernel(kernels.paged_decode_attention, *args, 0.125)
        torch.set_num_threads(2)
        two = run_kernel(kernels.paged_decode_attention, *args, 0.125)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)  # each (row, kv head) is computed by exactly one thread


def test_public_wrapper_uses_kernel_and_converts_index_dtypes(kernels):
    q, k, v, bt, sl = make_case([3, 20, 31], heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    out = attention_ops.paged_decode_attention(q, k, v, bt.long(), sl.long(), 0.125)
    expected = run_kernel(kernels.paged_decode_attention, q, k, v, bt, sl, 0.125)
    assert torch.equal(out, expected)


def test_kernel_input_validation(kernels):
    q, k, v, bt, sl = make_case([3, 20], heads=4, kv_heads=2, head_dim=64)
    f = kernels.paged_decode_attention
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        f(out.half(), q.half(), k.half(), v.half(), bt, sl, 0.1)
    with pytest.raises(RuntimeError, match="dtype"):
        f(out, q, k.bfloat16(), v.bfloat16(), bt, sl, 0.1)
    padded = torch.zeros(*k.shape[:3], 2 * k.shape[3])[..., : k.shape[3]]  # same shape, rows not packed
    with pytest.raises(RuntimeError, match="must be contiguous"):
        f(out, q, padded, padded, bt, sl, 0.1)
    with pytest.raises(RuntimeError, match="int32"):
        f(out, q, k, v, bt.long(), sl, 0.1)
    with pytest.raises(RuntimeError, match="multiple of num kv heads"):
        f(torch.empty(2, 3, 64), torch.randn(2, 3, 64), k, v, bt, sl, 0.1)
    with pytest.raises(RuntimeError, match="head_dim"):
        f(torch.empty(2, 4, 32), torch.randn(2, 4, 32), k, v, bt, sl, 0.1)
    with pytest.raises(RuntimeError, match="out of range"):
        f(out, q, k, v, bt, torch.tensor([3, 10_000], dtype=torch.int32), 0.1)
    bad = bt.clone()
    bad[1, 0] = k.shape[0]
    with pytest.raises(RuntimeError, match=r"block_tables\[1, 0\].*out of range"):
        f(out, q, k, v, bad, sl, 0.1)
    with pytest.raises(RuntimeError, match="shape"):
        f(torch.empty(2, 4, 63), q, k, v, bt, sl, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,group", [(8, 1), (6, 2), (3, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_row_and_head_chunk_items(kernels, dtype, kv_heads, group, threads):
    # Few rows -> rows are split into kv-head chunks (incl. uneven ones for 6 and 3 kv heads);
    # many rows -> one item per row. Both must agree with the reference, ragged lengths included.
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for seq_lens in ([70], [33, 1, 200], [5, 17, 48, 0, 31, 64, 2, 99, 16, 40]):
            args = make_case(seq_lens, heads=kv_heads * group, kv_heads=kv_heads, head_dim=64,
                             dtype=dtype, seed=len(seq_lens) + kv_heads)
            ref = paged_decode_attention_reference(*args, 0.125)
            assert_close(run_kernel(kernels.paged_decode_attention, *args, 0.125), ref, dtype)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("head_dim", [16, 48, 80, 160])
def test_kernel_bf16_dot_tails(kernels, head_dim):
    # bf16 q.k runs in 32-element chunks; these head dims end in a masked partial chunk.
    args = make_case([1, 15, 16, 47], heads=4, kv_heads=2, head_dim=head_dim, dtype=torch.bfloat16,
                     seed=head_dim)
    scale = head_dim ** -0.5
    ref = paged_decode_attention_reference(*args, scale)
    assert_close(run_kernel(kernels.paged_decode_attention, *args, scale), ref, torch.bfloat16)


# --------------------------------------------------------------------------- every variant
# (the `variant` fixture: tests/unit/conftest.py)


def test_variant_module_reports_its_simd(variant):
    name, mod = variant
    assert mod.simd == name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_variant_matches_reference_random_shapes(variant, dtype, block_size, group):
    # Random batch / lengths (zeros, single tokens, block-exact and ragged), kv heads and head dims;
    # caches are strided views with NaN/inf garbage past seq_len and in padding block-table entries.
    _, mod = variant
    rng = random.Random(f"{block_size}-{group}-{dtype}")
    for trial in range(3):
        seq_lens = [rng.choice([0, 1, block_size, block_size + 1, rng.randint(1, 6 * block_size)])
                    for _ in range(rng.randint(1, 6))]
        seq_lens[rng.randrange(len(seq_lens))] = rng.randint(2, 8 * block_size) | 1  # never a multiple
        kv_heads = rng.choice([1, 2, 3])
        head_dim = rng.choice([64, 128, 32, 80, 40])
        args = make_case(seq_lens, heads=kv_heads * group, kv_heads=kv_heads, head_dim=head_dim,
                         block_size=block_size, dtype=dtype, seed=rng.randrange(1 << 30))
        scale = head_dim ** -0.5
        ref = paged_decode_attention_reference(*args, scale)
        out = run_kernel(mod.paged_decode_attention, *args, scale)
        assert out.dtype == dtype and torch.isfinite(out).all(), (trial, seq_lens, kv_heads, head_dim)
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 24, 33, 48, 96, 160, 256])
def test_variant_head_dim_tails(variant, dtype, head_dim):
    # Tails of every vector width: 8-, 16- and 32-element chunks, and an odd head dim.
    _, mod = variant
    args = make_case([1, 15, 16, 47], heads=6, kv_heads=2, head_dim=head_dim, block_size=16, dtype=dtype,
                     seed=head_dim)
    scale = head_dim ** -0.5
    assert_close(run_kernel(mod.paged_decode_attention, *args, scale),
                 paged_decode_attention_reference(*args, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variant_long_context_peaked_softmax(variant, dtype):
    # Large logits (|s| ~ 100s) stress the max subtraction and exp's range clamp; block size 24.
    _, mod = variant
    args = make_case([1000, 517, 24], heads=8, kv_heads=2, head_dim=64, block_size=24, dtype=dtype,
                     q_scale=30.0, seed=7)
    ref = paged_decode_attention_reference(*args, 0.125)
    assert_close(run_kernel(mod.paged_decode_attention, *args, 0.125), ref, dtype)


def test_variant_zero_length_rows_and_thread_invariance(variant):
    _, mod = variant
    args = make_case([0, 9, 0, 16, 33, 1, 70, 2], heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_kernel(mod.paged_decode_attention, *args, 0.125)
        torch.set_num_threads(2)
        two = run_kernel(mod.paged_decode_attention, *args, 0.125)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    assert torch.equal(one[0].float(), torch.zeros(8, 64)) and torch.equal(one[2].float(), torch.zeros(8, 64))
    assert_close(one, paged_decode_attention_reference(*args, 0.125), torch.bfloat16)


def test_variant_validates_input(variant):
    _, mod = variant
    q, k, v, bt, sl = make_case([3, 20], heads=4, kv_heads=2, head_dim=64)
    bad = bt.clone()
    bad[1, 0] = k.shape[0]
    with pytest.raises(RuntimeError, match=r"block_tables\[1, 0\].*out of range"):
        mod.paged_decode_attention(torch.empty_like(q), q, k, v, bad, sl, 0.1)


# --------------------------------------------------------------------------- choosing a variant

ZEN4 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni"
ICELAKE = "sse4_2 avx f16c fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512vbmi"
KNL = "sse4_2 avx f16c fma avx2 avx512f avx512cd avx512er avx512pf"  # AVX-512F without BW/VL
ZEN2 = "sse4_2 avx f16c fma avx2 bmi2"
AVX2_NO_FMA = "sse4_2 avx avx2"
SANDY_BRIDGE = "sse4_2 avx"
ARM = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics"


@pytest.mark.parametrize("flags,expected", [
    (ZEN4, "avx512_bf16"),
    (ICELAKE, "avx512"),
    (KNL, "avx2"),
    (ZEN2, "avx2"),
    (AVX2_NO_FMA, "scalar"),
    (SANDY_BRIDGE, "scalar"),
    (ARM, "scalar"),
    ("", "scalar"),
])
def test_choose_variant(flags, expected):
    assert choose_variant(frozenset(flags.split())) == expected


def test_runnable_variants_best_first():
    assert [v.name for v in runnable_variants(frozenset(ZEN4.split()))] == ["avx512_bf16", "avx512", "avx2", "scalar"]
    assert [v.name for v in runnable_variants(frozenset(ZEN2.split()))] == ["avx2", "scalar"]
    assert [v.name for v in runnable_variants(frozenset())] == ["scalar"]


def test_cpu_flags_fall_back_to_torch_capability(monkeypatch):
    def no_cpuinfo(*a, **k):
        raise OSError("no /proc here")
    monkeypatch.setattr("builtins.open", no_cpuinfo)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert choose_variant(attention_ops.cpu_flags()) == "avx2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert choose_variant(attention_ops.cpu_flags()) == "avx512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert choose_variant(attention_ops.cpu_flags()) == "scalar"


def test_cpu_flags_come_from_dtype_policys_reader(monkeypatch):
    from services.engine import dtype_policy
    monkeypatch.setattr(dtype_policy, "_cpu_info", lambda path="/proc/cpuinfo": (frozenset(ZEN4.split()), "Zen 4"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # must not be used
    assert attention_ops.cpu_flags() == frozenset(ZEN4.split())
    assert choose_variant(attention_ops.cpu_flags()) == "avx512_bf16"


def test_kernel_build_dirs_separate_variants(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_KERNEL_CACHE", str(tmp_path))
    dirs = {attention_ops.kernel_build_dir(v.name) for v in VARIANTS}
    assert len(dirs) == len(VARIANTS) and all(d.parent == tmp_path for d in dirs)
    monkeypatch.delenv("TANDEM_KERNEL_CACHE")
    assert len({attention_ops.kernel_build_dir(v.name) for v in VARIANTS}) == len(VARIANTS)


# --------------------------------------------------------------------------- build failures

COMPILE_ERROR = ("Error building extension 'tandem_cpu_kernels_avx512_bf16': [1/2] c++ -MMD -mavx512bf16 ...\n"
                 "FAILED: paged_attention.o\n"
                 "c++: error: unrecognized command-line option '-mavx512bf16'\n"
                 "ninja: build stopped: subcommand failed.")


class FakeBuild:
    """Stands in for build_variant: fails the named variants, returns a stub module for the others."""

    def __init__(self, failing):
        self.failing, self.calls = set(failing), []

    def __call__(self, v: KernelVariant):
        self.calls.append(v.name)
        if v.name in self.failing:
            raise RuntimeError(COMPILE_ERROR)
        return types.SimpleNamespace(simd=v.name)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_build_failure_falls_back_to_next_variant_and_says_why(caplog):
    build = FakeBuild(failing={"avx512_bf16"})
    loader = KernelLoader(flags=frozenset(ZEN4.split()), build=build)
    with caplog.at_level(logging.INFO, logger="services.engine.attention_ops"):
        mod = loader.load()
    assert mod.simd == "avx512"
    warned = warnings_of(caplog)
    assert any("avx512_bf16 failed to build or load" in w and "unrecognized command-line option" in w for w in warned)
    assert any("variant avx512, not this CPU's best (avx512_bf16)" in w for w in warned)
    assert "unrecognized command-line option" in loader.error("avx512_bf16")
    assert loader.load() is mod and loader.load("avx512_bf16") is None
    assert build.calls == ["avx512_bf16", "avx512"]  # a failed build is not retried


def test_every_build_failing_falls_back_to_reference(monkeypatch, caplog):
    loader = KernelLoader(flags=frozenset(ZEN2.split()), build=FakeBuild(failing={"avx2", "scalar"}))
    monkeypatch.setattr(attention_ops, "_loader", loader)
    monkeypatch.delenv("TANDEM_DISABLE_KERNELS", raising=False)
    args = make_case([3, 20], heads=4, kv_heads=2, head_dim=16)
    with caplog.at_level(logging.WARNING, logger="services.engine.attention_ops"):
        out = attention_ops.paged_decode_attention(*args, 0.25)
    assert torch.equal(out, paged_decode_attention_reference(*args, 0.25))
    warned = warnings_of(caplog)
    assert any("avx2 failed to build or load" in w for w in warned) and any("scalar failed to build or load" in w for w in warned)
    assert any("reference path" in w for w in warned)


def test_scalar_choice_is_a_warning_not_silent(caplog):
    loader = KernelLoader(flags=frozenset(SANDY_BRIDGE.split()), build=FakeBuild(failing=()))
    with caplog.at_level(logging.WARNING, logger="services.engine.attention_ops"):
        assert loader.load().simd == "scalar"
    assert any("slow portable path" in w for w in warnings_of(caplog))


def test_loading_a_variant_the_cpu_cannot_run_raises():
    loader = KernelLoader(flags=frozenset(ZEN2.split()), build=FakeBuild(failing=()))
    with pytest.raises(ValueError, match="lacks avx512"):
        loader.load("avx512")
    with pytest.raises(ValueError, match="unknown kernel variant"):
        loader.load("neon")
    assert loader.load("avx2").simd == "avx2"


def test_real_compile_failure_is_a_clear_error(monkeypatch, tmp_path, caplog):
    # A real torch/ninja/g++ build with a flag the compiler rejects: a one-line warning naming the
    # variant and the compiler's error, then the fallback; no traceback escapes.
    monkeypatch.setenv("TANDEM_KERNEL_CACHE", str(tmp_path))
    broken = KernelVariant("scalar", frozenset(), ("-mtandem-no-such-isa",))
    loader = KernelLoader(flags=frozenset(), build=lambda v: attention_ops.build_variant(broken))
    with caplog.at_level(logging.WARNING, logger="services.engine.attention_ops"):
        assert loader.load() is None
    err = loader.error("scalar")
    assert err.startswith("RuntimeError: ") and "\n" not in err
    assert "tandem-no-such-isa" in err and "error" in err.lower()
    assert any("scalar failed to build or load" in w for w in warnings_of(caplog))
