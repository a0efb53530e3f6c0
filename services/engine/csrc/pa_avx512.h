// Tandem paged decode attention: the AVX-512 path (the `avx512` and `avx512_bf16` builds).
//
// 16-float vectors; any head_dim (tails via masked loads), with compile-time specialisations for
// D = 64 and 128. Per group of 16 tokens and kv head (see pa_vector_item.h):
//   scores  16 independent q . k dot products (vdpbf16ps on bf16 with AVX512-BF16, else FMA on
//           K widened with shifts), reduced together by one transpose-and-add tree,
//   softmax the lazy online update, p = exp(s - m) in one vector,
//   p . V   each V row is loaded once for all G query heads that share it. bf16 with AVX512-BF16:
//           p is rounded to bf16 (as FlashAttention does for its P.V matmul; the softmax sum is
//           taken over the same rounded p) and two tokens go into one vdpbf16ps: their V rows
//           interleaved by one unpack, times (p[t], p[t+1]) broadcast. Otherwise float FMA.
// Accumulation is float32 throughout. Private to paged_attention.cpp; requires AVX-512F/BW/VL.
#pragma once

#include <immintrin.h>

#include <cmath>
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
namespace avx512 {

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

// exp for x <= ~88: range reduction to r in [-ln2/2, ln2/2], then a Taylor polynomial of degree
// DEG (7: rel. error ~1e-7, for float p; 5: ~3e-6, for p that is rounded to bf16 next), scaling
// by 2^n with scalef (which underflows gracefully to denormals / zero for very negative x).
template <int DEG = 7>
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y;
  if constexpr (DEG == 7) {
    y = _mm512_set1_ps(1.0f / 5040.0f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 720.0f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 120.0f));
  } else {
    y = _mm512_set1_ps(1.0f / 120.0f);
  }
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 24.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// ---- layouts ------------------------------------------------------------------------------
// How a head's D elements sit in its NV = ceil(D / 16) accumulator vectors ("kernel order"); q
// and the accumulators are kept in it, only the final store undoes it:
//   NAT (float; bf16 with D % 32 != 0): vector c holds elements [16c, 16c + 16), the last one
//       masked when D % 16 != 0.
//   IL  (bf16 without AVX512-BF16, D % 32 == 0): vectors 2j / 2j+1 hold the even / odd elements of
//       [32j, 32j + 32): one 64-byte load of 32 bf16 becomes two float vectors with one shift
//       (even: bits << 16) and one AND (odd: bits & 0xffff0000), no cross-lane widening.
//   DP  (bf16 with AVX512-BF16, D % 32 == 0): vpunpckl/hwd of two tokens' 64-byte loads pair
//       their elements per 128-bit lane: vector 2j holds elements 8L + (0..3), vector 2j+1
//       elements 8L + (4..7), of [32j, 32j + 32), for lanes L = 0..3.
enum Layout { NAT, IL, DP };

inline int64_t layout_index(Layout lay, int64_t d) {
  if (lay == NAT) return d;
  const int64_t c = d / 32, j = d % 32;
  if (lay == IL) return c * 32 + (j & 1) * 16 + j / 2;
  const int64_t L = j / 8, r = j % 8;
  return c * 32 + (r >= 4) * 16 + 4 * L + (r & 3);
}

// Round to nearest even, NaN kept quiet: float_to_bf16 of 16 floats at once.
inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                   _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  r = _mm512_srli_epi32(r, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
inline void store_vec(float* o, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(o, m, x); }
inline void store_vec(bf16_bits* o, __m512 x, __mmask16 m) { _mm256_mask_storeu_epi16(o, m, to_bf16(x)); }

// ---- scores: q . k ------------------------------------------------------------------------
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

// r[t] = q . k[t] for the 16 rows kr[t] + hoff (unscaled). The 16 dot products are independent
// (one short dependency chain each) and are reduced together, transpose-and-add style: lane t of
// the result only ever combines elements of token t's partial vector. The tree is built as the
// tokens come (pairs, then quads, ...), so only a few partial vectors are live at once (all 16
// at once would spill next to the softmax constants). NC: chunks when fixed at compile time,
// else 0 (runtime).
template <typename T, int NC>
inline __m512 dot1(const float* qs, const T* r, int nc_rt, bool has_tail, typename Dot<T>::Mask tail) {
  const int nc = NC > 0 ? NC : nc_rt;
  __m512 acc = _mm512_setzero_ps();
  for (int c = 0; c < nc; ++c) acc = Dot<T>::step(acc, qs, r, c, NC == 0 && has_tail && c + 1 == nc, tail);
  return acc;
}
// Level 1..4 of the tree: (u, w) -> lanes of u's and w's sums interleaved at the level's grain.
inline __m512 tr1(__m512 u, __m512 w) { return _mm512_add_ps(_mm512_unpacklo_ps(u, w), _mm512_unpackhi_ps(u, w)); }
inline __m512 tr2(__m512 u, __m512 w) {
  return _mm512_add_ps(_mm512_shuffle_ps(u, w, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(u, w, _MM_SHUFFLE(3, 2, 3, 2)));
}
inline __m512 tr3(__m512 u, __m512 w) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(3, 1, 3, 1)));
}
template <typename T, int NC>
TANDEM_NOINLINE __m512 dots16(const float* qs, const T* const* kr, int64_t hoff, int nc_rt, bool has_tail,
                     typename Dot<T>::Mask tail) {
  auto d = [&](int t) { return dot1<T, NC>(qs, kr[t] + hoff, nc_rt, has_tail, tail); };
  auto quad = [&](int t) { return tr2(tr1(d(t), d(t + 1)), tr1(d(t + 2), d(t + 3))); };
  const __m512 lo = tr3(quad(0), quad(4));
  const __m512 hi = tr3(quad(8), quad(12));
  return tr3(lo, hi);
}

// GQA, 4 query heads at once (G % 4 == 0, compile-time head dim): the heads' q are packed so
// that 128-bit lane L of chunk c holds head L's elements [E c, E c + E) (E = 8 bf16 or 4 floats),
// and each K chunk is broadcast to all four lanes. One vdpbf16ps / FMA then serves 4 heads, and
// a token's accumulator holds 4 partial sums per head instead of 16: 4 tokens reduce to one
// vector (lane 4L + t) in 3 tree steps, and a 4 x 4 transpose of 128-bit lanes gives each head
// its 16 scores. ~4x fewer reduction ops than one 16-lane tree per (head, token).
template <typename T> struct Dot4;
template <> struct Dot4<float> {
  static constexpr int E = 4;
  static __m512 step(__m512 acc, const float* qv, const float* r, int c) {
    return _mm512_fmadd_ps(_mm512_load_ps(qv + c * 16), _mm512_broadcast_f32x4(_mm_loadu_ps(r + c * E)), acc);
  }
};
#ifdef __AVX512BF16__
template <> struct Dot4<bf16_bits> {
  static constexpr int E = 8;
  static __m512 step(__m512 acc, const float* qv, const bf16_bits* r, int c) {
    const __m512i k = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + c * E)));
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_load_si512(qv + c * 16), (__m512bh)k);
  }
};
#endif

// Repacks 4 heads' q (as Dot<T>::prep_q left them: D elements each, qld floats apart) in place.
template <typename T>
inline void pack_q4(float* qs, int64_t qld, int64_t D) {
  constexpr int E = Dot4<T>::E;
  T tmp[4 * 128];  // D <= 128 (the Dot4 path is compiled for D = 64 and 128 only)
  for (int h = 0; h < 4; ++h) std::memcpy(tmp + h * D, reinterpret_cast<const T*>(qs + h * qld), sizeof(T) * D);
  T* o = reinterpret_cast<T*>(qs);
  for (int64_t c = 0; c < D / E; ++c)
    for (int h = 0; h < 4; ++h)
      for (int e = 0; e < E; ++e) o[(c * 4 + h) * E + e] = tmp[h * D + c * E + e];
}

// The 16 scores of 4 heads (unscaled) into x[0..3].
template <typename T, int D>
TANDEM_NOINLINE void dots16x4(const float* qv, const T* const* kr, int64_t hoff, __m512 (&x)[4]) {
  constexpr int NCH = D / Dot4<T>::E;
  __m512 v[4];
  for (int k = 0; k < 4; ++k) {
    __m512 a[4];
    for (int t = 0; t < 4; ++t) {
      const T* r = kr[4 * k + t] + hoff;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int c = 0; c < NCH; c += 2) {
        a0 = Dot4<T>::step(a0, qv, r, c);
        a1 = Dot4<T>::step(a1, qv, r, c + 1);
      }
      a[t] = _mm512_add_ps(a0, a1);
    }
    v[k] = tr2(tr1(a[0], a[1]), tr1(a[2], a[3]));  // lane 4L + t: token 4k + t, head L
  }
  const __m512 x0 = _mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 x1 = _mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 x2 = _mm512_shuffle_f32x4(v[2], v[3], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 x3 = _mm512_shuffle_f32x4(v[2], v[3], _MM_SHUFFLE(3, 2, 3, 2));
  x[0] = _mm512_shuffle_f32x4(x0, x2, _MM_SHUFFLE(2, 0, 2, 0));
  x[1] = _mm512_shuffle_f32x4(x0, x2, _MM_SHUFFLE(3, 1, 3, 1));
  x[2] = _mm512_shuffle_f32x4(x1, x3, _MM_SHUFFLE(2, 0, 2, 0));
  x[3] = _mm512_shuffle_f32x4(x1, x3, _MM_SHUFFLE(3, 1, 3, 1));
}

// ---- online softmax -------------------------------------------------------------------------
// x: one head's scaled scores, valid in lanes `valid`. st: the head's state (acc[accf] | l[16] |
// m). Moves m when a score passes it by more than kMaxSlack (rescaling acc and l by
// exp(m_old - m_new)); returns p = exp(x - m), zero in invalid lanes.
template <int DEG>
inline __m512 softmax_step(__m512 x, __mmask16 valid, float* st, int64_t accf) {
  float& m = st[accf + 16];
  if (_mm512_mask_cmp_ps_mask(valid, x, _mm512_set1_ps(m + kMaxSlack), _CMP_GT_OQ)) {
    const float mn = _mm512_mask_reduce_max_ps(valid, x);
    if (m != -std::numeric_limits<float>::infinity()) {  // else acc and l are still 0
      const __m512 alpha = _mm512_set1_ps(std::exp(m - mn));
      for (int64_t i = 0; i < accf + 16; i += 16) _mm512_store_ps(st + i, _mm512_mul_ps(_mm512_load_ps(st + i), alpha));
    }
    m = mn;
  }
  return _mm512_maskz_mov_ps(valid, exp512<DEG>(_mm512_sub_ps(x, _mm512_set1_ps(m))));
}

// ---- p . V -----------------------------------------------------------------------------------
// acc[g] (GT heads, lds floats apart) += sum_t p[g][t] v[t] over NS accumulator vectors starting
// at vector v0, i.e. V elements from v0 * 16 on. With GT * NS <= 8 accumulators, even / odd steps
// go to two sets (shorter dependency chains), added at the end.

// DP: steps are token pairs (2k, 2k + 1); pp[g * 16 + k] = (p[g][2k], p[g][2k + 1]) as bf16.
template <int GT, int NS>
TANDEM_NOINLINE void pv_dp(const uint32_t* pp, const bf16_bits* const* vr, int64_t off, int npairs, float* acc,
                  int64_t lds) {
  constexpr int S = GT * NS <= 8 ? 2 : 1;
  __m512 a[S][GT][NS];
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < NS; ++c) {
      a[0][g][c] = _mm512_load_ps(acc + g * lds + c * 16);
      if constexpr (S == 2) a[S - 1][g][c] = _mm512_setzero_ps();
    }
  auto step = [&](int k, int s) {
    const bf16_bits* r0 = vr[2 * k] + off;
    const bf16_bits* r1 = vr[2 * k + 1] + off;
    __m512i w[NS];
    for (int c = 0; c < NS / 2; ++c) {
      const __m512i x0 = _mm512_loadu_si512(r0 + 32 * c), x1 = _mm512_loadu_si512(r1 + 32 * c);
      w[2 * c] = _mm512_unpacklo_epi16(x0, x1);
      w[2 * c + 1] = _mm512_unpackhi_epi16(x0, x1);
    }
    for (int g = 0; g < GT; ++g) {
      const __m512i pb = _mm512_set1_epi32(static_cast<int>(pp[g * 16 + k]));
      for (int c = 0; c < NS; ++c) a[s][g][c] = _mm512_dpbf16_ps(a[s][g][c], (__m512bh)pb, (__m512bh)w[c]);
    }
  };
  int k = 0;
  for (; k + 1 < npairs; k += 2) step(k, 0), step(k + 1, S - 1);
  if (k < npairs) step(k, 0);
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < NS; ++c) {
      __m512 r = a[0][g][c];
      if constexpr (S == 2) r = _mm512_add_ps(r, a[S - 1][g][c]);
      _mm512_store_ps(acc + g * lds + c * 16, r);
    }
}

// Vector c (absolute index) of a row in layout LAY; `tail` masks the last NAT vector.
template <typename T, Layout LAY>
inline __m512 load_vec(const T* row, int64_t c, bool last, __mmask16 tail) {
  if constexpr (LAY == IL) {
    const __m512i x = _mm512_loadu_si512(row + (c >> 1) * 32);
    return (c & 1) ? _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))))
                   : _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  } else {
    return last ? load16(row + c * 16, tail) : load16(row + c * 16);
  }
}

// FMA: steps are tokens; pf[g * 16 + t] = p[g][t]. TAIL: the section's last vector is the
// row's masked last one (NAT, D % 16 != 0).
template <typename T, Layout LAY, int GT, int NS, bool TAIL>
TANDEM_NOINLINE void pv_fma(const float* pf, const T* const* vr, int64_t v0, int n, float* acc, int64_t lds,
                   __mmask16 tail) {
  constexpr int S = GT * NS <= 8 ? 2 : 1;
  __m512 a[S][GT][NS];
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < NS; ++c) {
      a[0][g][c] = _mm512_load_ps(acc + g * lds + (v0 + c) * 16);
      if constexpr (S == 2) a[S - 1][g][c] = _mm512_setzero_ps();
    }
  auto step = [&](int t, int s) {
    __m512 vv[NS];
    for (int c = 0; c < NS; ++c) vv[c] = load_vec<T, LAY>(vr[t], v0 + c, TAIL && c + 1 == NS, tail);
    for (int g = 0; g < GT; ++g) {
      const __m512 pb = _mm512_set1_ps(pf[g * 16 + t]);
      for (int c = 0; c < NS; ++c) a[s][g][c] = _mm512_fmadd_ps(pb, vv[c], a[s][g][c]);
    }
  };
  int t = 0;
  for (; t + 1 < n; t += 2) step(t, 0), step(t + 1, S - 1);
  if (t < n) step(t, 0);
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < NS; ++c) {
      __m512 r = a[0][g][c];
      if constexpr (S == 2) r = _mm512_add_ps(r, a[S - 1][g][c]);
      _mm512_store_ps(acc + g * lds + (v0 + c) * 16, r);
    }
}

// The kernel type item_vec runs (see pa_vector_item.h). NV: 16-float vectors per head when
// fixed at compile time (D = 64: 4, 128: 8), else 0 (runtime head_dim).
template <typename T, Layout LAY, int NV>
struct Avx512Kernel {
  using Dt = Dot<T>;
  static constexpr int kTokens = 16;
  static constexpr int NC = NV * 16 / Dt::W;  // q.k chunks (compile time; 0 = runtime nc)

  int64_t D;
  int nc;  // q.k chunks of Dt::W elements
  bool k_tail;
  typename Dt::Mask k_tail_mask;
  int nv;  // 16-float vectors per head
  __mmask16 v_tail;

  explicit Avx512Kernel(int64_t d)
      : D(d),
        nc(static_cast<int>((d + Dt::W - 1) / Dt::W)),
        k_tail(d % Dt::W != 0),
        k_tail_mask(static_cast<typename Dt::Mask>((1ull << (d % Dt::W)) - 1u)),
        nv(static_cast<int>((d + 15) / 16)),
        v_tail((d % 16) ? static_cast<__mmask16>((1u << (d % 16)) - 1u) : static_cast<__mmask16>(0xffff)) {}

  int64_t q_floats() const { return static_cast<int64_t>(nc) * Dt::QF; }
  int64_t acc_floats() const { return static_cast<int64_t>(nv) * 16; }
  void prep_q(const T* q, float* qs) const { Dt::prep_q(q, D, nc, qs); }

  // Whether groups of 4 query heads take the Dot4 path (see dots16x4).
#ifdef __AVX512BF16__
  static constexpr bool kG4Layout = LAY == DP || (LAY == NAT && std::is_same<T, float>::value);
#else
  static constexpr bool kG4Layout = LAY == NAT && std::is_same<T, float>::value;
#endif
  static constexpr bool g4(int64_t G) { return kG4Layout && NV > 0 && G % 4 == 0; }
  // After prep_q of the item's NH query heads: repack each 4-head group for the Dot4 path.
  void pack_q(float* qs, int64_t qld, int64_t NH, int64_t G) const {
    if constexpr (kG4Layout && NV > 0) {
      if (g4(G))
        for (int64_t h = 0; h < NH; h += 4) pack_q4<T>(qs + h * qld, qld, D);
    }
  }

  // o[d] = f * acc element d (kernel order undone by one two-source permute per 16 elements).
  template <typename O>
  void finish(const float* acc, float f, O* o) const {
    const __m512 fv = _mm512_set1_ps(f);
    for (int c = 0; c < nv; ++c) {
      __m512 x;
      if constexpr (LAY == NAT) {
        x = _mm512_load_ps(acc + c * 16);
      } else {
        // natural elements [16c, 16c + 16) of the chunk's two vectors (see layout_index)
        alignas(64) int32_t idx[16];
        for (int d = 0; d < 16; ++d) idx[d] = static_cast<int32_t>(layout_index(LAY, (c & 1) * 16 + d));
        const float* a = acc + (c >> 1) * 32;
        x = _mm512_permutex2var_ps(_mm512_load_ps(a), _mm512_load_si512(idx), _mm512_load_ps(a + 16));
      }
      store_vec(o + c * 16, _mm512_mul_ps(x, fv), c + 1 == nv ? v_tail : static_cast<__mmask16>(0xffff));
    }
  }

  // One token group (n tokens, rows kr[t] / vr[t]) for the item's nh kv heads (row offsets hoff0
  // + j * D) and their nh * G query heads, in three phases so that independent work sits side by
  // side: all scores (K), then all softmax updates (their exp chains overlap), then all p . V (V).
  // xb: 16 floats per query head of scratch (scores, then p). tick(j, 2 nh) runs before kv head j's
  // scores and tick(nh + j, 2 nh) before its p . V (the caller spreads its prefetches over them).
  template <typename F>
  void group(int64_t nh, int64_t G, const float* qs, int64_t qld, const T* const* kr, const T* const* vr,
             int64_t hoff0, int n, float scale, float* st, int64_t lds, float* xb, F&& tick) const {
    const __mmask16 valid = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
    const int64_t accf = acc_floats();
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < nh; ++j) {
      tick(j, 2 * nh);
      if constexpr (kG4Layout && NV > 0) {
        if (g4(G)) {
          for (int64_t g = 0; g < G; g += 4) {
            const int64_t h = j * G + g;
            __m512 x[4];
            dots16x4<T, NV * 16>(qs + h * qld, kr, hoff0 + j * D, x);
            for (int i = 0; i < 4; ++i) _mm512_store_ps(xb + (h + i) * 16, _mm512_mul_ps(x[i], sv));
          }
          continue;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = j * G + g;
        _mm512_store_ps(xb + h * 16, _mm512_mul_ps(dots16<T, NC>(qs + h * qld, kr, hoff0 + j * D, nc, k_tail, k_tail_mask), sv));
      }
    }
    for (int64_t h = 0; h < nh * G; ++h) {
      float* sh = st + h * lds;
      __m512 pr = softmax_step<LAY == DP ? 5 : 7>(_mm512_load_ps(xb + h * 16), valid, sh, accf);
      if constexpr (LAY == DP) {
#ifdef __AVX512BF16__
        const __m256i pb = (__m256i)_mm512_cvtneps_pbh(pr);
        _mm256_store_si256(reinterpret_cast<__m256i*>(xb + h * 16), pb);
        pr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(pb), 16));  // the p . V weights
#endif
      } else {
        _mm512_store_ps(xb + h * 16, pr);
      }
      _mm512_store_ps(sh + accf, _mm512_add_ps(_mm512_load_ps(sh + accf), pr));
    }
    for (int64_t j = 0; j < nh; ++j) {
      tick(nh + j, 2 * nh);
      values(G, xb + j * G * 16, vr, hoff0 + j * D, n, st + j * G * lds, lds);
    }
  }

  // p . V for G heads (p 16 floats apart): tiles of 8 / 4 / 2 / 1 heads, each over the head dim
  // in sections of NS vectors (GT * NS <= 16 accumulators in registers).
  void values(int64_t G, const float* pb, const T* const* vr, int64_t hoff, int n, float* acc, int64_t lds) const {
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) tile<8>(pb + g * 16, vr, hoff, n, acc + g * lds, lds);
    for (; g + 4 <= G; g += 4) tile<4>(pb + g * 16, vr, hoff, n, acc + g * lds, lds);
    for (; g + 2 <= G; g += 2) tile<2>(pb + g * 16, vr, hoff, n, acc + g * lds, lds);
    for (; g < G; ++g) tile<1>(pb + g * 16, vr, hoff, n, acc + g * lds, lds);
  }

  template <int GT>
  void tile(const float* pb, const T* const* vr, int64_t hoff, int n, float* acc, int64_t lds) const {
    if constexpr (LAY == DP) {
#ifdef __AVX512BF16__
      const uint32_t* pp = reinterpret_cast<const uint32_t*>(pb);
      const int npairs = (n + 1) / 2;
      if constexpr (NV > 0) {
        constexpr int NS = NV < 16 / GT ? NV : (16 / GT < 2 ? 2 : 16 / GT);
        for (int v0 = 0; v0 < NV; v0 += NS) pv_dp<GT, NS>(pp, vr, hoff + v0 * 16, npairs, acc + v0 * 16, lds);
      } else {
        for (int v0 = 0; v0 < nv; v0 += 2) pv_dp<GT, 2>(pp, vr, hoff + v0 * 16, npairs, acc + v0 * 16, lds);
      }
#endif
    } else {
      const T* rows[16];
      for (int t = 0; t < 16; ++t) rows[t] = vr[t] + hoff;
      if constexpr (NV > 0) {
        constexpr int NS0 = NV < 16 / GT ? NV : 16 / GT;
        constexpr int NS = LAY == IL && NS0 < 2 ? 2 : NS0;
        for (int v0 = 0; v0 < NV; v0 += NS) pv_fma<T, LAY, GT, NS, false>(pb, rows, v0, n, acc, lds, v_tail);
      } else if constexpr (LAY == IL) {
        for (int v0 = 0; v0 < nv; v0 += 2) pv_fma<T, LAY, GT, 2, false>(pb, rows, v0, n, acc, lds, v_tail);
      } else {
        int v0 = 0;
        for (; v0 + 1 < nv; ++v0) pv_fma<T, LAY, GT, 1, false>(pb, rows, v0, n, acc, lds, v_tail);
        pv_fma<T, LAY, GT, 1, true>(pb, rows, v0, n, acc, lds, v_tail);
      }
    }
  }
};

}  // namespace avx512

template <typename T>
void item_avx512(const Params& p, const T* q, T* out, const T* kc, const T* vc, const Item& it,
                 std::vector<float>& scratch) {
  using avx512::Avx512Kernel;
  if constexpr (std::is_same<T, bf16_bits>::value) {
#ifdef __AVX512BF16__
    constexpr avx512::Layout L = avx512::DP;
#else
    constexpr avx512::Layout L = avx512::IL;
#endif
    if (p.D == 64) return item_vec<Avx512Kernel<T, L, 4>>(p, q, out, kc, vc, it, scratch);
    if (p.D == 128) return item_vec<Avx512Kernel<T, L, 8>>(p, q, out, kc, vc, it, scratch);
    if (p.D % 32 == 0) return item_vec<Avx512Kernel<T, L, 0>>(p, q, out, kc, vc, it, scratch);
  } else {
    if (p.D == 64) return item_vec<Avx512Kernel<T, avx512::NAT, 4>>(p, q, out, kc, vc, it, scratch);
    if (p.D == 128) return item_vec<Avx512Kernel<T, avx512::NAT, 8>>(p, q, out, kc, vc, it, scratch);
  }
  item_vec<Avx512Kernel<T, avx512::NAT, 0>>(p, q, out, kc, vc, it, scratch);
}

}  // namespace
