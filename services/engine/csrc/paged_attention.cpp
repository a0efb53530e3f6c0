// Tandem: CPU paged-attention decode kernel.
//
// One query token per sequence attends over that sequence's K/V, which live in
// fixed-size blocks of a shared paged cache. Work item = one sequence (all kv
// heads; split into kv-head chunks only for small batches), see item_avx512 and
// run(). All `group` query heads sharing a kv head are processed together, so
// each K/V row is read from memory once, in place (no gather copy):
//   pass 1  scores s[h][t] = scale * (q[h] . k[t]) for all tokens (K read once),
//   pass 2  softmax in place in a per-thread scratch of seq_len floats per head,
//   pass 3  out[h] = sum_t p[h][t] v[t] / sum_t p[h][t] (V read once).
// bf16 q.k uses vdpbf16ps (AVX512-BF16) when available; accumulation is float32
// for both bf16 and fp32.
//
// Layout:
//   q, out        [B, H, D] contiguous, bf16 or fp32 (same dtype)
//   k/v_cache     [num_blocks, block_size, Hkv, D]; dim 0 may have any stride
//                 (views of a [num_blocks, num_layers, 2, block_size, Hkv, D]
//                 cache); dims 1..3 must be contiguous.
//   block_tables  int32 [B, max_blocks], row stride arbitrary, unit col stride;
//                 entries past ceil(seq_len / block_size) are never read.
//   seq_lens      int32 [B]; 0 gives a zero output row.
//   H = Hkv * group; query head h uses kv head h / group.
//
// The AVX-512 path (compiled when the build targets AVX-512F/BW/VL) handles any
// head_dim (tail via masked loads), with compile-time specialisations for D = 64
// and 128 and a shuffle-free bf16 layout when D % 32 == 0. A portable scalar path
// (online softmax, one token at a time) is always compiled; it is used when
// AVX-512 is unavailable and is exported as `paged_decode_attention_scalar` so
// tests can cover it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define TANDEM_HAVE_AVX512 1
#else
#define TANDEM_HAVE_AVX512 0
#endif

#ifndef TANDEM_PF_DIST
#define TANDEM_PF_DIST 2  // how many blocks ahead to prefetch K/V rows
#endif
#ifndef TANDEM_PF_HINT
#define TANDEM_PF_HINT _MM_HINT_T0
#endif

namespace {

using bf16_bits = uint16_t;

inline float bf16_to_float(bf16_bits h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round-to-nearest-even, NaN kept quiet (same as torch's conversion).
inline bf16_bits float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_bits>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16_bits>(u >> 16);
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_bits x) { return bf16_to_float(x); }
inline void store_out(float* p, float x) { *p = x; }
inline void store_out(bf16_bits* p, float x) { *p = float_to_bf16(x); }

struct Params {
  int64_t B, H, Hkv, G, D, block_size, max_blocks;
  int64_t k_stride0, v_stride0;  // elements between consecutive blocks
  int64_t row_stride;            // elements between consecutive tokens in a block (Hkv * D)
  int64_t bt_stride0;            // elements between block_tables rows
  const int32_t* block_tables;
  const int32_t* seq_lens;
  float scale;
};

// ---------------------------------------------------------------------------
// Scalar path (portable; also the reference for the vector path's structure).
// ---------------------------------------------------------------------------
template <typename T>
void item_scalar(const Params& p, const T* q, T* out, const T* kc, const T* vc,
                 int64_t b, int64_t kvh, std::vector<float>& scratch) {
  const int64_t G = p.G, D = p.D;
  const int64_t len = p.seq_lens[b];
  const T* qrow = q + (b * p.H + kvh * G) * D;
  T* orow = out + (b * p.H + kvh * G) * D;
  if (len <= 0) {
    for (int64_t i = 0; i < G * D; ++i) store_out(orow + i, 0.0f);
    return;
  }
  scratch.assign(static_cast<size_t>(2 * G * D + 2 * G), 0.0f);
  float* qf = scratch.data();
  float* acc = qf + G * D;
  float* m = acc + G * D;
  float* l = m + G;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(qrow[i]) * p.scale;
  for (int64_t g = 0; g < G; ++g) m[g] = -std::numeric_limits<float>::infinity();

  const int32_t* bt = p.block_tables + b * p.bt_stride0;
  const int64_t nblk = (len + p.block_size - 1) / p.block_size;
  for (int64_t i = 0; i < nblk; ++i) {
    const int64_t blk = bt[i];
    const T* kb = kc + blk * p.k_stride0 + kvh * D;
    const T* vb = vc + blk * p.v_stride0 + kvh * D;
    const int64_t ntok = std::min(p.block_size, len - i * p.block_size);
    for (int64_t t = 0; t < ntok; ++t) {
      const T* kr = kb + t * p.row_stride;
      const T* vr = vb + t * p.row_stride;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * D;
        float s = 0.0f;
        for (int64_t d = 0; d < D; ++d) s += qg[d] * to_float(kr[d]);
        float* ag = acc + g * D;
        if (s > m[g]) {
          const float alpha = std::exp(m[g] - s);  // exp(-inf) = 0 on first token
          l[g] *= alpha;
          for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
          m[g] = s;
        }
        const float pr = std::exp(s - m[g]);
        l[g] += pr;
        for (int64_t d = 0; d < D; ++d) ag[d] += pr * to_float(vr[d]);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / l[g];
    for (int64_t d = 0; d < D; ++d) store_out(orow + g * D + d, acc[g * D + d] * inv);
  }
}

#if TANDEM_HAVE_AVX512
// ---------------------------------------------------------------------------
// AVX-512 path.
// ---------------------------------------------------------------------------
inline __m512 load16(const float* p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
inline __m512 load16(const bf16_bits* p, __mmask16 mk) {
  const __m256i h = _mm256_maskz_loadu_epi16(mk, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16_bits* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp for x <= ~88: range reduction to r in [-ln2/2, ln2/2], degree-7
// polynomial (rel. error ~1e-7), scaling by 2^n with scalef (which underflows
// gracefully to denormals / zero for very negative x).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.0f / 5040.0f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 720.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 120.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 24.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// Horizontal sums of 16 vectors at once (in registers): returns r with r[t] = sum(v[t][0..15]).
// Lane t of the result only ever combines elements of v[t], so garbage in one vector (e.g. a
// masked-out token) never leaks into another lane.
inline __m512 transpose_reduce16(const __m512 (&v)[16]) {
  __m512 b[8];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 c[4];
  for (int i = 0; i < 4; ++i) {
    const __m512 u = b[2 * i], w = b[2 * i + 1];
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(u, w, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u, w, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 d[2];
  for (int i = 0; i < 2; ++i) {
    const __m512 u = c[2 * i], w = c[2 * i + 1];
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
// Kernel order of a D-vector as NV 16-float vectors:
//   IL = false: vector c holds elements [16c, 16c + 16)  (the last one masked if D % 16 != 0).
//   IL = true (bf16, D % 32 == 0): vectors 2j / 2j+1 hold the even / odd elements of
//     [32j, 32j + 32). One 64-byte load of 32 bf16 then becomes two float vectors with one
//     shift (even: bits << 16) and one AND (odd: bits & 0xffff0000), no cross-lane widening.
// q (scaled, as float) and the output accumulators are kept in kernel order; only the final
// store undoes the permutation. Dot products don't care about the order.
inline int64_t kernel_index(bool il, int64_t d) {
  if (!il) return d;
  const int64_t c = d / 32, j = d % 32;
  return c * 32 + (j & 1) * 16 + j / 2;
}

template <typename T, bool IL>
inline __m512 load_vec(const T* row, int c, bool last, __mmask16 tail) {
  if constexpr (IL) {
    const __m512i x = _mm512_loadu_si512(row + (c >> 1) * 32);
    return (c & 1) ? _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))))
                   : _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  } else {
    return last ? load16(row + c * 16, tail) : load16(row + c * 16);
  }
}

// ---- pass 1: scores --------------------------------------------------------------------
// q . k runs over the head dim in chunks of Dot<T>::W elements:
//   bf16 with AVX512-BF16: W = 32, one vdpbf16ps per chunk. It multiplies 32 bf16 pairs exactly
//     and accumulates in fp32; q is bf16 already, so nothing is rounded before accumulation.
//     The q chunk is the 32 raw bf16 values (kept unscaled; the scale is applied to the sum).
//   bf16 without it: W = 32; the 64-byte K chunk is widened to its even / odd elements with one
//     shift / one AND (no cross-lane shuffles), q chunk = its even floats, then its odd floats.
//   fp32: W = 16, plain FMA; q chunk = 16 floats.
// The last chunk's K load is masked when D % W != 0 (q is zero-padded there). QF is the number
// of floats one q chunk takes in the scratch.
template <typename T> struct Dot;

template <> struct Dot<float> {
  static constexpr int W = 16, QF = 16;
  using Mask = __mmask16;
  static void prep_q(const float* q, int64_t D, int nc, float* qs) {
    for (int64_t d = 0; d < nc * 16; ++d) qs[d] = d < D ? q[d] : 0.0f;
  }
  static __m512 step(__m512 acc, const float* qs, const float* kr, int c, bool masked, Mask m) {
    const __m512 k = masked ? _mm512_maskz_loadu_ps(m, kr + c * 16) : _mm512_loadu_ps(kr + c * 16);
    return _mm512_fmadd_ps(_mm512_load_ps(qs + c * 16), k, acc);
  }
};

template <> struct Dot<bf16_bits> {
  using Mask = __mmask32;
  static constexpr int W = 32;
#ifdef __AVX512BF16__
  static constexpr int QF = 16;  // 32 bf16 = 16 floats' worth of bytes
  static void prep_q(const bf16_bits* q, int64_t D, int nc, float* qs) {
    bf16_bits* o = reinterpret_cast<bf16_bits*>(qs);
    for (int64_t d = 0; d < nc * 32; ++d) o[d] = d < D ? q[d] : 0;
  }
  static __m512 step(__m512 acc, const float* qs, const bf16_bits* kr, int c, bool masked, Mask m) {
    const __m512i k = masked ? _mm512_maskz_loadu_epi16(m, kr + c * 32) : _mm512_loadu_si512(kr + c * 32);
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_load_si512(qs + c * 16), (__m512bh)k);
  }
#else
  static constexpr int QF = 32;
  static void prep_q(const bf16_bits* q, int64_t D, int nc, float* qs) {
    for (int64_t d = 0; d < nc * 32; ++d) {
      const int64_t c = d / 32, j = d % 32;
      qs[c * 32 + (j & 1) * 16 + j / 2] = d < D ? bf16_to_float(q[d]) : 0.0f;
    }
  }
  static __m512 step(__m512 acc, const float* qs, const bf16_bits* kr, int c, bool masked, Mask m) {
    const __m512i k = masked ? _mm512_maskz_loadu_epi16(m, kr + c * 32) : _mm512_loadu_si512(kr + c * 32);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(k, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(k, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    acc = _mm512_fmadd_ps(_mm512_load_ps(qs + c * 32), even, acc);
    return _mm512_fmadd_ps(_mm512_load_ps(qs + c * 32 + 16), odd, acc);
  }
#endif
};

// s[t] = scale * (q . k[t]) for the n (1..16) tokens of one head starting at kb. The 16 tokens
// are independent dot products (one short dependency chain each), so they overlap at full
// throughput; their partial vectors are reduced together in registers. Rows past n re-read
// row 0 (always valid memory; a short block may end right there) and are masked out on store.
template <typename T, int NC>
inline void scores16(const float* qs, const T* kb, int64_t rs, int n, int nc_rt, bool has_tail,
                     typename Dot<T>::Mask tail, float scale, float* s) {
  const int nc = NC > 0 ? NC : nc_rt;
  __m512 a[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    const T* kr = kb + (t < n ? t : 0) * rs;
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < nc; ++c) acc = Dot<T>::step(acc, qs, kr, c, NC == 0 && has_tail && c + 1 == nc, tail);
    a[t] = acc;
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
  _mm512_mask_storeu_ps(s, valid, _mm512_mul_ps(transpose_reduce16(a), _mm512_set1_ps(scale)));
}

// ---- pass 2: softmax over one head's len scores, in place: s <- exp(s - max); returns sum.
inline float softmax_inplace(float* s, int64_t len) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + i));
  const __mmask16 tm = static_cast<__mmask16>((1u << (len - i)) - 1u);
  if (i < len) mx = _mm512_mask_max_ps(mx, tm, mx, _mm512_maskz_loadu_ps(tm, s + i));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m512 p0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
    const __m512 p1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i + 16), m));
    _mm512_storeu_ps(s + i, p0);
    _mm512_storeu_ps(s + i + 16, p1);
    sum0 = _mm512_add_ps(sum0, p0);
    sum1 = _mm512_add_ps(sum1, p1);
  }
  for (; i < len; i += 16) {
    const __mmask16 mk = len - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (len - i)) - 1u);
    const __m512 pr = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + i), m)));
    _mm512_mask_storeu_ps(s + i, mk, pr);
    sum0 = _mm512_add_ps(sum0, pr);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

// ---- pass 3: values ----------------------------------------------------------------------
// acc[g] += sum_{t < n} p[g * lds + t] * v[t] for GT heads over one block's n tokens.
// Register variant (NV > 0, GT * NV <= 16): all accumulators in registers; when that leaves
// spare registers, even / odd tokens go to separate accumulator sets to halve the FMA
// dependency chains.
template <typename T, bool IL, int GT, int NV>
inline void values_block(const float* p, int64_t lds, const T* vb, int64_t row_stride, int n,
                         float* acc, int64_t ldq, int nv_rt, __mmask16 tail) {
  if constexpr (NV > 0 && GT * NV <= 16) {
    constexpr int S = GT * NV <= 8 ? 2 : 1;
    __m512 a[S][GT][NV];
    for (int g = 0; g < GT; ++g)
      for (int c = 0; c < NV; ++c) {
        a[0][g][c] = _mm512_loadu_ps(acc + g * ldq + c * 16);
        if constexpr (S == 2) a[S - 1][g][c] = _mm512_setzero_ps();
      }
    auto step = [&](int t, int set) {
      const T* vr = vb + t * row_stride;
      __m512 vv[NV];
      for (int c = 0; c < NV; ++c) vv[c] = load_vec<T, IL>(vr, c, false, tail);
      for (int g = 0; g < GT; ++g) {
        const __m512 pb = _mm512_set1_ps(p[g * lds + t]);
        for (int c = 0; c < NV; ++c) a[set][g][c] = _mm512_fmadd_ps(pb, vv[c], a[set][g][c]);
      }
    };
    int t = 0;
    for (; t + 1 < n; t += 2) {
      step(t, 0);
      step(t + 1, S - 1);
    }
    if (t < n) step(t, 0);
    for (int g = 0; g < GT; ++g)
      for (int c = 0; c < NV; ++c) {
        __m512 r = a[0][g][c];
        if constexpr (S == 2) r = _mm512_add_ps(r, a[S - 1][g][c]);
        _mm512_storeu_ps(acc + g * ldq + c * 16, r);
      }
  } else {
    const int nv = NV > 0 ? NV : nv_rt;
    for (int c = 0; c < nv; ++c) {
      const bool last = NV == 0 && c + 1 == nv;
      __m512 a0[GT], a1[GT];
      for (int g = 0; g < GT; ++g) {
        a0[g] = _mm512_loadu_ps(acc + g * ldq + c * 16);
        a1[g] = _mm512_setzero_ps();
      }
      int t = 0;
      for (; t + 1 < n; t += 2) {
        const __m512 v0 = load_vec<T, IL>(vb + t * row_stride, c, last, tail);
        const __m512 v1 = load_vec<T, IL>(vb + (t + 1) * row_stride, c, last, tail);
        for (int g = 0; g < GT; ++g) {
          a0[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * lds + t]), v0, a0[g]);
          a1[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * lds + t + 1]), v1, a1[g]);
        }
      }
      if (t < n) {
        const __m512 v0 = load_vec<T, IL>(vb + t * row_stride, c, last, tail);
        for (int g = 0; g < GT; ++g) a0[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * lds + t]), v0, a0[g]);
      }
      for (int g = 0; g < GT; ++g) _mm512_storeu_ps(acc + g * ldq + c * 16, _mm512_add_ps(a0[g], a1[g]));
    }
  }
}

template <typename T, bool IL, int NV>
inline void values_block_all_heads(int64_t G, const float* p, int64_t lds, const T* vb,
                                   int64_t row_stride, int n, float* acc, int64_t ldq, int nv,
                                   __mmask16 tail) {
  // Largest head tile whose accumulators fit in registers (D = 64: 4 heads, D = 128: 2).
  constexpr int kMaxTile = NV == 0 ? 8 : (16 / NV >= 8 ? 8 : 16 / NV >= 4 ? 4 : 16 / NV >= 2 ? 2 : 1);
  for (int64_t g0 = 0; g0 < G;) {
    const int64_t left = G - g0;
    const float* p0 = p + g0 * lds;
    float* a0 = acc + g0 * ldq;
    if (kMaxTile >= 8 && left >= 8) {
      values_block<T, IL, 8, NV>(p0, lds, vb, row_stride, n, a0, ldq, nv, tail), g0 += 8;
    } else if (kMaxTile >= 4 && left >= 4) {
      values_block<T, IL, 4, NV>(p0, lds, vb, row_stride, n, a0, ldq, nv, tail), g0 += 4;
    } else if (kMaxTile >= 2 && left >= 2) {
      values_block<T, IL, 2, NV>(p0, lds, vb, row_stride, n, a0, ldq, nv, tail), g0 += 2;
    } else {
      values_block<T, IL, 1, NV>(p0, lds, vb, row_stride, n, a0, ldq, nv, tail), g0 += 1;
    }
  }
}

// Software prefetch of one kv head's slice (row_bytes) of each of `rows` token rows.
template <typename T>
inline void prefetch_rows(const T* base, int64_t rows, int64_t row_stride, int64_t row_bytes) {
  for (int64_t t = 0; t < rows; ++t) {
    const char* r = reinterpret_cast<const char*>(base + t * row_stride);
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(r + off, TANDEM_PF_HINT);
  }
}

// One work item: row b, kv heads [h0, h0 + nh) (all of them unless the batch is too small to
// feed every thread, see run()). Within a block one layer's K (and V) for all kv heads is one
// contiguous [block_size, Hkv, D] run, so walking the block token by token and head by head
// streams it sequentially; per-(row, head) items would instead read D-element slices at an
// Hkv * D stride from every block, Hkv times over.
//   pass 1  scores s[h][t] for all nh * G query heads (K read once, in place),
//   pass 2  softmax in place in a per-thread scratch of seq_len floats per head,
//   pass 3  out[h] = sum_t p[h][t] v[t] / sum_t p[h][t] (V read once).
// Splitting the passes keeps every inner loop free of serial dependencies (the online-softmax
// alternative puts max/exp/rescale on the critical path of every block). Blocks are scattered,
// so the slices of the block PF_DIST ahead are prefetched in software, one kv head at a time
// (spread over the current block's work so the prefetches don't queue up in one burst).
template <typename T, bool IL, int NV>
void item_avx512(const Params& p, const T* q, T* out, const T* kc, const T* vc, int64_t b, int64_t h0,
                 int64_t nh, std::vector<float>& scratch) {
  const int64_t G = p.G, D = p.D, NH = nh * G;  // NH query heads in this item
  const int64_t len = p.seq_lens[b];
  const T* qrow = q + (b * p.H + h0 * G) * D;
  T* orow = out + (b * p.H + h0 * G) * D;
  if (len <= 0) {
    for (int64_t i = 0; i < NH * D; ++i) store_out(orow + i, 0.0f);
    return;
  }
  using Dt = Dot<T>;
  constexpr int NC = NV * 16 / Dt::W;  // q.k chunks (compile time; 0 = runtime nc)
  const int nc = static_cast<int>((D + Dt::W - 1) / Dt::W);
  const int64_t qld = static_cast<int64_t>(nc) * Dt::QF;  // scratch floats per head of q
  const bool k_tail = D % Dt::W != 0;
  const typename Dt::Mask k_tail_mask = static_cast<typename Dt::Mask>((1ull << (D % Dt::W)) - 1u);
  const int nv = static_cast<int>((D + 15) / 16);  // 16-float vectors per head in pass 3
  const int64_t ldq = static_cast<int64_t>(nv) * 16;
  const __mmask16 v_tail = (D % 16) ? static_cast<__mmask16>((1u << (D % 16)) - 1u) : static_cast<__mmask16>(0xffff);
  const int64_t lds = (len + 15) / 16 * 16;

  // Per-thread scratch, reused across items and calls (only grows): q chunks, accumulators,
  // scores / probabilities, 1 / softmax sums. 64-byte aligned for the q loads.
  const size_t need = static_cast<size_t>(NH * (qld + ldq + lds + 1) + 16);
  if (scratch.size() < need) scratch.resize(need);
  float* qs = scratch.data() + ((64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64) / sizeof(float);
  float* acc = qs + NH * qld;
  float* s = acc + NH * ldq;  // [NH][lds]
  float* inv = s + NH * lds;
  for (int64_t h = 0; h < NH; ++h) Dt::prep_q(qrow + h * D, D, nc, qs + h * qld);
  std::memset(acc, 0, sizeof(float) * NH * ldq);

  const int32_t* bt = p.block_tables + b * p.bt_stride0;
  const int64_t bs = p.block_size, rs = p.row_stride;
  const int64_t nblk = (len + bs - 1) / bs;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  auto ntok = [&](int64_t i) { return std::min(bs, len - i * bs); };
  auto prefetch = [&](const T* cache, int64_t stride0, int64_t i, int64_t j) {
    if (TANDEM_PF_DIST > 0 && i < nblk) prefetch_rows(cache + bt[i] * stride0 + (h0 + j) * D, ntok(i), rs, row_bytes);
  };

  for (int64_t i = 0; i < TANDEM_PF_DIST; ++i)
    for (int64_t j = 0; j < nh; ++j) prefetch(kc, p.k_stride0, i, j);
  for (int64_t i = 0; i < nblk; ++i) {
    const T* kb = kc + bt[i] * p.k_stride0 + h0 * D;
    const int64_t nt = ntok(i);
    for (int64_t j = 0; j < nh; ++j) {
      if (i + TANDEM_PF_DIST < nblk) prefetch(kc, p.k_stride0, i + TANDEM_PF_DIST, j);
      else prefetch(vc, p.v_stride0, i + TANDEM_PF_DIST - nblk, j);  // V's first blocks
      for (int64_t t0 = 0; t0 < nt; t0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, nt - t0));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = j * G + g;
          scores16<T, NC>(qs + h * qld, kb + j * D + t0 * rs, rs, n, nc, k_tail, k_tail_mask, p.scale,
                          s + h * lds + i * bs + t0);
        }
      }
    }
  }
  for (int64_t h = 0; h < NH; ++h) inv[h] = 1.0f / softmax_inplace(s + h * lds, len);
  for (int64_t i = 0; i < nblk; ++i) {
    const T* vb = vc + bt[i] * p.v_stride0 + h0 * D;
    for (int64_t j = 0; j < nh; ++j) {
      prefetch(vc, p.v_stride0, i + TANDEM_PF_DIST, j);
      values_block_all_heads<T, IL, NV>(G, s + j * G * lds + i * bs, lds, vb + j * D, rs,
                                        static_cast<int>(ntok(i)), acc + j * G * ldq, ldq, nv, v_tail);
    }
  }
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t d = 0; d < D; ++d) store_out(orow + h * D + d, acc[h * ldq + kernel_index(IL, d)] * inv[h]);
}

template <typename T>
void item_avx512_dispatch(const Params& p, const T* q, T* out, const T* kc, const T* vc, int64_t b,
                          int64_t h0, int64_t nh, std::vector<float>& scratch) {
  if constexpr (std::is_same<T, bf16_bits>::value) {
    if (p.D == 64) return item_avx512<T, true, 4>(p, q, out, kc, vc, b, h0, nh, scratch);
    if (p.D == 128) return item_avx512<T, true, 8>(p, q, out, kc, vc, b, h0, nh, scratch);
    if (p.D % 32 == 0) return item_avx512<T, true, 0>(p, q, out, kc, vc, b, h0, nh, scratch);
  } else {
    if (p.D == 64) return item_avx512<T, false, 4>(p, q, out, kc, vc, b, h0, nh, scratch);
    if (p.D == 128) return item_avx512<T, false, 8>(p, q, out, kc, vc, b, h0, nh, scratch);
  }
  item_avx512<T, false, 0>(p, q, out, kc, vc, b, h0, nh, scratch);
}
#endif  // TANDEM_HAVE_AVX512

// Work items are rows; a row is split into chunks of kv heads only when there are fewer than
// ~4 rows per thread (small batches / long contexts), so every thread still gets work. Threads
// take items dynamically from a shared counter, which balances ragged seq_lens. Every head's
// result is computed the same way whatever the split or thread, so output is thread-count invariant.
template <typename T>
void run(const Params& p, const T* q, T* out, const T* kc, const T* vc, bool force_scalar) {
  const int64_t nthreads = at::get_num_threads();
  int64_t split = 1;
  if (p.B < 4 * nthreads) split = std::min<int64_t>(p.Hkv, (4 * nthreads + p.B - 1) / p.B);
  const int64_t hpc = (p.Hkv + split - 1) / split;  // kv heads per item
  split = (p.Hkv + hpc - 1) / hpc;
  const int64_t items = p.B * split;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nthreads, items), 1, [&](int64_t, int64_t) {
    thread_local std::vector<float> scratch;
    for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t b = it / split, h0 = (it % split) * hpc, nh = std::min(hpc, p.Hkv - h0);
#if TANDEM_HAVE_AVX512
      if (!force_scalar) {
        item_avx512_dispatch<T>(p, q, out, kc, vc, b, h0, nh, scratch);
        continue;
      }
#endif
      for (int64_t kvh = h0; kvh < h0 + nh; ++kvh) item_scalar<T>(p, q, out, kc, vc, b, kvh, scratch);
    }
  });
}
void check_and_run(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                   at::Tensor block_tables, at::Tensor seq_lens, double scale, bool force_scalar) {
  const char* fn = "paged_decode_attention: ";
  for (const auto* t : {&out, &q, &k_cache, &v_cache, &block_tables, &seq_lens})
    TORCH_CHECK(t->device().is_cpu(), fn, "all tensors must be on the CPU, got ", t->device());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, fn,
              "q must be bfloat16 or float32, got ", q.scalar_type());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              fn, "out, k_cache and v_cache must have q's dtype (", q.scalar_type(), "), got out ",
              out.scalar_type(), ", k_cache ", k_cache.scalar_type(), ", v_cache ", v_cache.scalar_type());
  TORCH_CHECK(q.dim() == 3, fn, "q must be [B, H, D], got shape ", q.sizes());
  TORCH_CHECK(q.is_contiguous(), fn, "q must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes(), fn, "out shape ", out.sizes(), " must equal q shape ", q.sizes());
  TORCH_CHECK(out.is_contiguous(), fn, "out must be contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, fn,
              "k_cache and v_cache must be [num_blocks, block_size, Hkv, D], got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), fn, "k_cache shape ", k_cache.sizes(),
              " != v_cache shape ", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, fn, "cache head_dim ", k_cache.size(3), " != q head_dim ", D);
  TORCH_CHECK(D > 0 && bs > 0 && Hkv > 0, fn, "head_dim, block_size and Hkv must be positive");
  TORCH_CHECK(H % Hkv == 0, fn, "num query heads ", H, " must be a multiple of num kv heads ", Hkv);
  for (const auto* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) == D && t->stride(1) == Hkv * D, fn,
                "k_cache/v_cache dims 1..3 ([block_size, Hkv, D]) must be contiguous; got strides ",
                t->strides(), " for shape ", t->sizes());
    TORCH_CHECK(num_blocks <= 1 || t->stride(0) > 0, fn, "cache block stride must be positive, got ",
                t->stride(0));
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, fn,
              "block_tables and seq_lens must be int32, got ", block_tables.scalar_type(), " and ",
              seq_lens.scalar_type());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B, fn,
              "block_tables must be [B=", B, ", max_blocks], got ", block_tables.sizes());
  TORCH_CHECK(block_tables.size(1) <= 1 || block_tables.stride(1) == 1, fn,
              "block_tables rows must be contiguous");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, fn, "seq_lens must be [B=", B, "], got ",
              seq_lens.sizes());
  TORCH_CHECK(B <= 1 || seq_lens.stride(0) == 1, fn, "seq_lens must be contiguous");
  TORCH_CHECK(std::isfinite(scale), fn, "scale must be finite");

  Params p;
  p.B = B; p.H = H; p.Hkv = Hkv; p.G = H / Hkv; p.D = D; p.block_size = bs;
  p.max_blocks = block_tables.size(1);
  p.k_stride0 = k_cache.stride(0);
  p.v_stride0 = v_cache.stride(0);
  p.row_stride = Hkv * D;
  p.bt_stride0 = block_tables.stride(0);
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.scale = static_cast<float>(scale);

  // Validate lengths and the block ids that will actually be read (padding is ignored).
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = p.seq_lens[b];
    TORCH_CHECK(len >= 0 && len <= p.max_blocks * bs, fn, "seq_lens[", b, "] = ", len,
                " out of range [0, max_blocks * block_size = ", p.max_blocks * bs, "]");
    const int64_t nblk = (len + bs - 1) / bs;
    const int32_t* bt = p.block_tables + b * p.bt_stride0;
    for (int64_t i = 0; i < nblk; ++i)
      TORCH_CHECK(bt[i] >= 0 && bt[i] < num_blocks, fn, "block_tables[", b, ", ", i, "] = ", bt[i],
                  " out of range [0, ", num_blocks, ")");
  }
  if (B == 0 || H == 0) return;

  if (q.scalar_type() == at::kFloat) {
    run<float>(p, q.data_ptr<float>(), out.data_ptr<float>(), k_cache.data_ptr<float>(),
               v_cache.data_ptr<float>(), force_scalar);
  } else {
    run<bf16_bits>(p, reinterpret_cast<const bf16_bits*>(q.data_ptr()),
                   reinterpret_cast<bf16_bits*>(out.data_ptr()),
                   reinterpret_cast<const bf16_bits*>(k_cache.data_ptr()),
                   reinterpret_cast<const bf16_bits*>(v_cache.data_ptr()), force_scalar);
  }
}

}  // namespace

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor seq_lens, double scale) {
  check_and_run(out, q, k_cache, v_cache, block_tables, seq_lens, scale, /*force_scalar=*/false);
}

void paged_decode_attention_scalar(at::Tensor out, at::Tensor q, at::Tensor k_cache,
                                   at::Tensor v_cache, at::Tensor block_tables, at::Tensor seq_lens,
                                   double scale) {
  check_and_run(out, q, k_cache, v_cache, block_tables, seq_lens, scale, /*force_scalar=*/true);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention (writes out); see paged_attention.cpp for layouts",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention_scalar", &paged_decode_attention_scalar,
        "Same as paged_decode_attention but always uses the portable scalar path (for tests)",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.attr("simd") = TANDEM_HAVE_AVX512 ? "avx512" : "scalar";
}
