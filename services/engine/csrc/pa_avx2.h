// Tandem paged decode attention: the AVX2 path (the `avx2` build: AVX2 + FMA hosts without
// AVX-512, e.g. Zen 1-3, Haswell .. Alder Lake).
//
// Same one-pass structure as the AVX-512 path (pa_vector_item.h), with 8-float vectors and float32
// math throughout (a group of 16 tokens is two 8-token halves). A head's D elements are walked in chunks of 16 (one 32-byte bf16 load, or two fp32
// loads), each held as two 8-float vectors; a D % 16 tail chunk is copied into a zero-padded
// buffer (AVX2 has no 16-bit masked loads). All G query heads of a kv head use each K/V row while
// it is in registers / L1. Private to paged_attention.cpp; requires AVX2 and FMA.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pa_common.h"
#include "pa_vector_item.h"

#ifndef TANDEM_NOINLINE
#define TANDEM_NOINLINE __attribute__((noinline))
#endif

namespace {
namespace avx2 {

// A 16-element chunk of a row as two 8-float vectors, in kernel order:
//   float: lo = elements [0, 8), hi = [8, 16);
//   bf16:  lo = the even elements, hi = the odd ones: one load, one shift (even: bits << 16) and
//          one AND (odd: bits & 0xffff0000), no cross-lane widening.
// q and the accumulators are kept in the same order (chunk_index); dot products don't care, and
// only the final store undoes it.
struct Chunk {
  __m256 lo, hi;
};

inline Chunk load_chunk(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Chunk load_chunk(const bf16_bits* p) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))))};
}
// The first rem (1..15) elements, zeros after. Never reads past them: the row may end the cache.
template <typename T>
inline Chunk load_chunk_partial(const T* p, int rem) {
  alignas(32) T buf[16] = {};
  std::memcpy(buf, p, sizeof(T) * static_cast<size_t>(rem));
  return load_chunk(buf);
}

template <typename T>
inline int64_t chunk_index(int64_t d) {
  if constexpr (std::is_same<T, float>::value) return d;
  const int64_t j = d % 16;
  return d - j + (j & 1) * 8 + j / 2;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
// All-ones in lanes [0, n), zeros after: the mask for maskload / maskstore of n floats.
inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// r[t] = sum of v[t]'s 8 lanes. Lane t only ever combines elements of v[t], so garbage in one
// vector (a token past the block's end) never leaks into another lane.
inline __m256 transpose_reduce8(const __m256 (&v)[8]) {
  const __m256 c0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 c1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // c0 = [v0..v3 low-half sums | v0..v3 high-half sums], c1 likewise for v4..v7.
  return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

// exp(x) for x <= kMaxSlack (the online softmax's lazy max lets a score pass the max by that
// much): range reduction to r in [-ln2/2, ln2/2], degree-7 polynomial (rel. error ~1e-7), times
// 2^n built in the exponent bits. x is clamped to [-87, 88], so 2^n stays a normal float
// (exp(-87) ~ 1.6e-38 stands in for anything smaller: negligible next to the max's 1).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.0f / 5040.0f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 720.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 120.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 24.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 6.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Round to nearest even, NaN kept quiet: float_to_bf16 of 8 floats at once.
inline __m128i to_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                   _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  r = _mm256_srli_epi32(r, 16);
  const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, q, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  r = _mm256_packus_epi32(r, r);  // per 128-bit lane: [a0..a3 a0..a3 | a4..a7 a4..a7]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(r, 0x08));
}

// ---- scores ---------------------------------------------------------------------------------
// r[t] = q . k[t] for the 8 rows kr[t] + hoff (unscaled). The chunk loop is outside, so each q
// chunk is loaded once for 8 independent accumulator chains. NC: full chunks when fixed at
// compile time (D = 64: 4, 128: 8; no tail), else 0 (runtime nfull / rem).
template <typename T, int NC>
TANDEM_NOINLINE __m256 dots8(const float* qs, const T* const* kr, int64_t hoff, int nfull_rt, int rem) {
  const int nfull = NC > 0 ? NC : nfull_rt;
  const T* r[8];
  __m256 a[8];
  for (int t = 0; t < 8; ++t) {
    r[t] = kr[t] + hoff;
    a[t] = _mm256_setzero_ps();
  }
  for (int c = 0; c < nfull; ++c) {
    const __m256 qlo = _mm256_load_ps(qs + c * 16), qhi = _mm256_load_ps(qs + c * 16 + 8);
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const Chunk k = load_chunk(r[t] + c * 16);
      a[t] = _mm256_fmadd_ps(qhi, k.hi, _mm256_fmadd_ps(qlo, k.lo, a[t]));
    }
  }
  if (NC == 0 && rem > 0) {
    const __m256 qlo = _mm256_load_ps(qs + nfull * 16), qhi = _mm256_load_ps(qs + nfull * 16 + 8);
    for (int t = 0; t < 8; ++t) {
      const Chunk k = load_chunk_partial(r[t] + nfull * 16, rem);
      a[t] = _mm256_fmadd_ps(qhi, k.hi, _mm256_fmadd_ps(qlo, k.lo, a[t]));
    }
  }
  return transpose_reduce8(a);
}

// ---- online softmax -----------------------------------------------------------------------
// x: one head's 16 scaled scores (in place), valid in the first n. st: the head's state (acc[accf]
// | l[16] | m). Moves m when a score passes it by more than kMaxSlack (rescaling acc and l by
// exp(m_old - m_new)); leaves p = exp(x - m) in x, zero past n, and adds it to l.
inline void softmax_step(float* x, int n, float* st, int64_t accf) {
  float& m = st[accf + 16];
  const __m256i v0 = first_lanes(n), v1 = first_lanes(n - 8);
  const __m256 x0 = _mm256_load_ps(x), x1 = _mm256_load_ps(x + 8);
  const __m256 thr = _mm256_set1_ps(m + kMaxSlack);
  const __m256 over = _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(x0, thr, _CMP_GT_OQ), _mm256_castsi256_ps(v0)),
                                   _mm256_and_ps(_mm256_cmp_ps(x1, thr, _CMP_GT_OQ), _mm256_castsi256_ps(v1)));
  if (_mm256_movemask_ps(over)) {
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const float mn = hmax(_mm256_max_ps(_mm256_blendv_ps(ninf, x0, _mm256_castsi256_ps(v0)),
                                        _mm256_blendv_ps(ninf, x1, _mm256_castsi256_ps(v1))));
    if (m != -std::numeric_limits<float>::infinity()) {  // else acc and l are still 0
      const __m256 alpha = _mm256_set1_ps(std::exp(m - mn));
      for (int64_t i = 0; i < accf + 16; i += 8) _mm256_store_ps(st + i, _mm256_mul_ps(_mm256_load_ps(st + i), alpha));
    }
    m = mn;
  }
  const __m256 mv = _mm256_set1_ps(m);
  const __m256 p0 = _mm256_and_ps(exp256(_mm256_sub_ps(x0, mv)), _mm256_castsi256_ps(v0));
  const __m256 p1 = _mm256_and_ps(exp256(_mm256_sub_ps(x1, mv)), _mm256_castsi256_ps(v1));
  _mm256_store_ps(x, p0);
  _mm256_store_ps(x + 8, p1);
  _mm256_store_ps(st + accf, _mm256_add_ps(_mm256_load_ps(st + accf), p0));
  _mm256_store_ps(st + accf + 8, _mm256_add_ps(_mm256_load_ps(st + accf + 8), p1));
}

// ---- p . V -----------------------------------------------------------------------------------
// acc[g] += sum_{t < n} p[g * lds + t] * v[t] for GT heads and CC chunks of the n rows vr[t] + off
// (off and acc at the tile's first chunk). Each V chunk is loaded once and used by
// all GT heads; GT * CC * 2 = 8 accumulators are 8 independent FMA chains in registers.
// PARTIAL: one chunk holding only the first rem elements of the row.
template <typename T, int GT, int CC, bool PARTIAL>
TANDEM_NOINLINE void values_tile(const float* p, int64_t lds, const T* const* vr, int64_t off, int n, int rem,
                                 float* acc, int64_t ldq) {
  __m256 a[GT][CC][2];
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < CC; ++c) {
      a[g][c][0] = _mm256_loadu_ps(acc + g * ldq + c * 16);
      a[g][c][1] = _mm256_loadu_ps(acc + g * ldq + c * 16 + 8);
    }
  for (int t = 0; t < n; ++t) {
    const T* r = vr[t] + off;
    Chunk v[CC];
    for (int c = 0; c < CC; ++c) v[c] = PARTIAL ? load_chunk_partial(r + c * 16, rem) : load_chunk(r + c * 16);
    for (int g = 0; g < GT; ++g) {
      const __m256 pb = _mm256_broadcast_ss(p + g * lds + t);
      for (int c = 0; c < CC; ++c) {
        a[g][c][0] = _mm256_fmadd_ps(pb, v[c].lo, a[g][c][0]);
        a[g][c][1] = _mm256_fmadd_ps(pb, v[c].hi, a[g][c][1]);
      }
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < CC; ++c) {
      _mm256_storeu_ps(acc + g * ldq + c * 16, a[g][c][0]);
      _mm256_storeu_ps(acc + g * ldq + c * 16 + 8, a[g][c][1]);
    }
}

// GT heads over the whole head dim: tiles of 4 / GT chunks, then single chunks, then the tail.
template <typename T, int GT>
inline void values_heads(const float* p, int64_t lds, const T* const* vr, int64_t off, int n, int nfull, int rem,
                         float* acc, int64_t ldq) {
  constexpr int CC = 4 / GT;
  int c = 0;
  for (; c + CC <= nfull; c += CC) values_tile<T, GT, CC, false>(p, lds, vr, off + c * 16, n, 0, acc + c * 16, ldq);
  for (; c < nfull; ++c) values_tile<T, GT, 1, false>(p, lds, vr, off + c * 16, n, 0, acc + c * 16, ldq);
  if (rem > 0) values_tile<T, GT, 1, true>(p, lds, vr, off + c * 16, n, rem, acc + c * 16, ldq);
}

template <typename T>
inline void values_block_all_heads(int64_t G, const float* p, int64_t lds, const T* const* vr, int64_t off, int n,
                                   float* acc, int64_t ldq, int nfull, int rem) {
  for (int64_t g0 = 0; g0 < G;) {
    const int64_t left = G - g0;
    const float* p0 = p + g0 * lds;
    float* a0 = acc + g0 * ldq;
    if (left >= 4) {
      values_heads<T, 4>(p0, lds, vr, off, n, nfull, rem, a0, ldq), g0 += 4;
    } else if (left >= 2) {
      values_heads<T, 2>(p0, lds, vr, off, n, nfull, rem, a0, ldq), g0 += 2;
    } else {
      values_heads<T, 1>(p0, lds, vr, off, n, nfull, rem, a0, ldq), g0 += 1;
    }
  }
}

// The kernel type item_vec runs (see pa_vector_item.h). NC: full 16-element chunks per head
// when fixed at compile time (D = 64: 4, D = 128: 8), else 0.
template <typename T, int NC>
struct Avx2Kernel {
  static constexpr int kTokens = 16;

  int64_t D;
  int nfull;  // full 16-element chunks per head
  int rem;    // elements in the partial last chunk (0: none)

  explicit Avx2Kernel(int64_t d) : D(d), nfull(static_cast<int>(d / 16)), rem(static_cast<int>(d % 16)) {}

  int64_t q_floats() const { return (nfull + (rem > 0 ? 1 : 0)) * 16; }
  int64_t acc_floats() const { return q_floats(); }
  void prep_q(const T* q, float* qs) const {
    std::memset(qs, 0, sizeof(float) * q_floats());
    for (int64_t d = 0; d < D; ++d) qs[chunk_index<T>(d)] = to_float(q[d]);
  }
  void pack_q(float*, int64_t, int64_t, int64_t) const {}

  // One token group for the item's nh kv heads: all scores, then all softmax updates, then all
  // p . V (see Avx512Kernel::group).
  template <typename F>
  void group(int64_t nh, int64_t G, const float* qs, int64_t qld, const T* const* kr, const T* const* vr,
             int64_t hoff0, int n, float scale, float* st, int64_t lds, float* xb, F&& tick) const {
    const int64_t accf = acc_floats(), NH = nh * G;
    const __m256 sv = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < nh; ++j) {
      tick(j, 2 * nh);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = j * G + g;
        _mm256_store_ps(xb + h * 16, _mm256_mul_ps(dots8<T, NC>(qs + h * qld, kr, hoff0 + j * D, nfull, rem), sv));
        _mm256_store_ps(xb + h * 16 + 8, _mm256_mul_ps(dots8<T, NC>(qs + h * qld, kr + 8, hoff0 + j * D, nfull, rem), sv));
      }
    }
    for (int64_t h = 0; h < NH; ++h) softmax_step(xb + h * 16, n, st + h * lds, accf);
    for (int64_t j = 0; j < nh; ++j) {
      tick(nh + j, 2 * nh);
      values_block_all_heads<T>(G, xb + j * G * 16, 16, vr, hoff0 + j * D, n, st + j * G * lds, lds, NC > 0 ? NC : nfull, rem);
    }
  }

  // o[d] = f * acc element d.
  template <typename O>
  void finish(const float* acc, float f, O* o) const {
    const __m256 fv = _mm256_set1_ps(f);
    for (int64_t c = 0; c * 16 < D; ++c) {
      alignas(32) float x[16];
      for (int d = 0; d < 16; ++d) x[d] = acc[c * 16 + chunk_index<T>(d)];
      const int m = static_cast<int>(std::min<int64_t>(16, D - c * 16));
      store16(o + c * 16, _mm256_mul_ps(_mm256_load_ps(x), fv), _mm256_mul_ps(_mm256_load_ps(x + 8), fv), m);
    }
  }
  static void store16(float* o, __m256 a, __m256 b, int m) {
    if (m == 16) {
      _mm256_storeu_ps(o, a), _mm256_storeu_ps(o + 8, b);
    } else {
      alignas(32) float x[16];
      _mm256_store_ps(x, a), _mm256_store_ps(x + 8, b);
      std::memcpy(o, x, sizeof(float) * m);
    }
  }
  static void store16(bf16_bits* o, __m256 a, __m256 b, int m) {
    const __m256i h = _mm256_set_m128i(to_bf16(b), to_bf16(a));
    if (m == 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), h);
    } else {
      alignas(32) bf16_bits x[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(x), h);
      std::memcpy(o, x, sizeof(bf16_bits) * m);
    }
  }
};

}  // namespace avx2

template <typename T>
void item_avx2(const Params& p, const T* q, T* out, const T* kc, const T* vc, const Item& it,
               std::vector<float>& scratch) {
  using avx2::Avx2Kernel;
  if (p.D == 64) return item_vec<Avx2Kernel<T, 4>>(p, q, out, kc, vc, it, scratch);
  if (p.D == 128) return item_vec<Avx2Kernel<T, 8>>(p, q, out, kc, vc, it, scratch);
  item_vec<Avx2Kernel<T, 0>>(p, q, out, kc, vc, it, scratch);
}

}  // namespace
