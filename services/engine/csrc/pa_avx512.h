// Tandem paged decode attention: the AVX-512 path (the `avx512` and `avx512_bf16` builds).
//
// 16-float vectors; any head_dim (tail via masked loads), with compile-time specialisations
// for D = 64 and 128 and a shuffle-free bf16 layout when D % 32 == 0. bf16 q.k uses vdpbf16ps
// when the build targets AVX512-BF16, else widens K with shifts; accumulation is float32.
// Private to paged_attention.cpp; requires AVX-512F/BW/VL.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "pa_common.h"
#include "pa_vector_item.h"

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

// The kernel type item_vec runs (see pa_vector_item.h). IL: interleaved bf16 layout (see
// kernel_index); NV: 16-float vectors per head when fixed at compile time (D = 64: 4, 128: 8),
// else 0 (runtime head_dim).
template <typename T, bool IL, int NV>
struct Avx512Kernel {
  using Dt = Dot<T>;
  static constexpr int kTokens = 16;
  static constexpr int NC = NV * 16 / Dt::W;  // q.k chunks (compile time; 0 = runtime nc)

  int64_t D;
  int nc;  // q.k chunks of Dt::W elements
  bool k_tail;
  typename Dt::Mask k_tail_mask;
  int nv;  // 16-float vectors per head in pass 3
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
  void scores(const float* qs, const T* kb, int64_t rs, int n, float scale, float* s) const {
    scores16<T, NC>(qs, kb, rs, n, nc, k_tail, k_tail_mask, scale, s);
  }
  static float softmax(float* s, int64_t len) { return softmax_inplace(s, len); }
  void values(int64_t G, const float* p, int64_t lds, const T* vb, int64_t rs, int n, float* acc,
              int64_t ldq) const {
    values_block_all_heads<T, IL, NV>(G, p, lds, vb, rs, n, acc, ldq, nv, v_tail);
  }
  int64_t acc_index(int64_t d) const { return kernel_index(IL, d); }
};

}  // namespace avx512

template <typename T>
void item_avx512(const Params& p, const T* q, T* out, const T* kc, const T* vc, int64_t b, int64_t h0,
                 int64_t nh, std::vector<float>& scratch) {
  using avx512::Avx512Kernel;
  if constexpr (std::is_same<T, bf16_bits>::value) {
    if (p.D == 64) return item_vec<Avx512Kernel<T, true, 4>>(p, q, out, kc, vc, b, h0, nh, scratch);
    if (p.D == 128) return item_vec<Avx512Kernel<T, true, 8>>(p, q, out, kc, vc, b, h0, nh, scratch);
    if (p.D % 32 == 0) return item_vec<Avx512Kernel<T, true, 0>>(p, q, out, kc, vc, b, h0, nh, scratch);
  } else {
    if (p.D == 64) return item_vec<Avx512Kernel<T, false, 4>>(p, q, out, kc, vc, b, h0, nh, scratch);
    if (p.D == 128) return item_vec<Avx512Kernel<T, false, 8>>(p, q, out, kc, vc, b, h0, nh, scratch);
  }
  item_vec<Avx512Kernel<T, false, 0>>(p, q, out, kc, vc, b, h0, nh, scratch);
}

}  // namespace
