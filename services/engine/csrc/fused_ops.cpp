// Tandem: fused elementwise ops of the Llama decoder for the CPU.
//
// At serving batch sizes a decode step's RMSNorms, residual adds, RoPE and SiLU-mul are a few
// hundred to a few thousand elements each: torch spends more time dispatching their 4-6 ops each
// than computing them. Each function here is one pass over its rows, with the rounding of the
// unfused torch code it replaces (so greedy tokens do not move):
//   rms_norm      out = w * to_dtype(x_f32 * rsqrt(mean(x_f32^2) + eps))         (HF LlamaRMSNorm)
//   add_rms_norm  residual = to_dtype(residual + delta); out = rms_norm(residual)
//   silu_mul      out = to_dtype(to_dtype(silu(g)) * u) for gate_up = [g | u]
//   rope_         x1, x2 halves of each head: x1' = r(r(x1 c) - r(x2 s)), x2' = r(r(x2 c) + r(x1 s)),
//                 c, s = to_dtype(cos/sin table[position]); r = to_dtype   (HF rotate_half)
// Shapes: rows are dim 0 (T tokens); every row is contiguous in its last dim; row strides may be
// anything (views of a fused qkv / gate_up projection). dtype float32 or bfloat16; out has x's dtype.
// Rows run in parallel (at::parallel_for) only when there are enough of them to pay for it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
// torch's own vector exp (SLEEF, 1.0 ulp), exported by libtorch_cpu: the same function torch's
// vectorised SiLU calls on this ISA, so the fused SiLU-mul rounds exactly as F.silu(g) * u does.
extern "C" {
#if defined(__AVX512F__)
__m512 Sleef_expf16_u10(__m512);
#else
__m256 Sleef_expf8_u10(__m256);
#endif
}
#endif

namespace {

constexpr int64_t kRowsPerTask = 16;   // below this many rows a step runs on the calling thread

template <typename T>
inline float f32(T x) { return static_cast<float>(x); }

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }   // float: identity; BFloat16: RNE

// Sum of squares in kLanes independent partial sums combined pairwise: the compiler vectorises
// it (a single running sum it may not reorder), and its rounding error grows like torch's
// vectorised reduction, not like a sequential sum's.
constexpr int64_t kLanes = 16;

template <typename T>
float sum_squares(const T* x, int64_t n) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = f32(x[i + j]);
      lane[j] += v * v;
    }
  for (int64_t j = 0; i < n; ++i, ++j) {
    const float v = f32(x[i]);
    lane[j] += v * v;
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) lane[j] += lane[j + width];
  return lane[0];
}

template <typename T>
void rms_norm_row(T* out, const T* x, const T* w, int64_t n, float eps) {
  const float ss = sum_squares(x, n);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = round_to<T>(f32(w[i]) * f32(round_to<T>(f32(x[i]) * inv)));
}

template <typename F>
void for_rows(int64_t rows, const F& fn) {
  if (rows < 2 * kRowsPerTask) {
    fn(0, rows);
  } else {
    at::parallel_for(0, rows, kRowsPerTask, fn);
  }
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2 && t.stride(-1) == 1, name, " must be [rows, ...] with a contiguous last dim");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(out.sizes() == x.sizes() && out.stride(-1) == 1 && out.scalar_type() == x.scalar_type(), "out like x");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(-1) && w.scalar_type() == x.scalar_type(), "w: [hidden]");
  const int64_t rows = x.size(0), n = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0), os = out.stride(0);
    for_rows(rows, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) rms_norm_row(op + r * os, xp + r * xs, wp, n, static_cast<float>(eps));
    });
  });
}

void add_rms_norm(torch::Tensor out, torch::Tensor residual, torch::Tensor delta, torch::Tensor w, double eps) {
  check_rows(residual, "residual");
  TORCH_CHECK(delta.sizes() == residual.sizes() && delta.stride(-1) == 1 &&
              delta.scalar_type() == residual.scalar_type(), "delta like residual");
  TORCH_CHECK(out.sizes() == residual.sizes() && out.stride(-1) == 1 &&
              out.scalar_type() == residual.scalar_type(), "out like residual");
  TORCH_CHECK(w.is_contiguous() && w.numel() == residual.size(-1) && w.scalar_type() == residual.scalar_type(),
              "w: [hidden]");
  const int64_t rows = residual.size(0), n = residual.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, residual.scalar_type(), "add_rms_norm", [&] {
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t rs = residual.stride(0), ds = delta.stride(0), os = out.stride(0);
    for_rows(rows, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* row = rp + r * rs;
        const scalar_t* d = dp + r * ds;
        for (int64_t i = 0; i < n; ++i) row[i] = round_to<scalar_t>(f32(row[i]) + f32(d[i]));
        rms_norm_row(op + r * os, row, wp, n, static_cast<float>(eps));
      }
    });
  });
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr bool kSiluMulVectorized = true;

#if defined(__AVX512F__)
constexpr int64_t kVecFloats = 16;
using vfloat = __m512;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat vsilu(vfloat x) {   // x / (1 + exp(-x)), torch's vector formula
  const vfloat neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), Sleef_expf16_u10(neg)));
}
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
#else
constexpr int64_t kVecFloats = 8;
using vfloat = __m256;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat vsilu(vfloat x) {
  const vfloat neg = _mm256_sub_ps(_mm256_setzero_ps(), x);
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), Sleef_expf8_u10(neg)));
}
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
#endif

// torch's vectorised elementwise loop runs 2 vectors of its scalar type at a time (2 x 16 floats,
// 2 x 32 bf16 on AVX-512) and the scalar op (std::exp) on what is left of the row; the same split
// here keeps every element's exp identical to torch's.
template <typename T>
constexpr int64_t vector_span() { return 2 * kVecFloats * (sizeof(float) / sizeof(T)); }

// One row: o[i] = r(r(silu(g[i])) * u[i]) with r = rounding to T.
template <typename T>
void silu_mul_row(T* o, const T* g, const T* u, int64_t n) {
  constexpr int64_t span = vector_span<T>();
  float gb[span], ub[span], ob[span];
  int64_t i = 0;
  for (; i + span <= n; i += span) {
    for (int64_t j = 0; j < span; ++j) { gb[j] = f32(g[i + j]); ub[j] = f32(u[i + j]); }
    for (int64_t j = 0; j < span; j += kVecFloats) vstore(ob + j, vsilu(vload(gb + j)));
    for (int64_t j = 0; j < span; ++j) ob[j] = f32(round_to<T>(ob[j]));
    for (int64_t j = 0; j < span; j += kVecFloats) vstore(ob + j, vmul(vload(ob + j), vload(ub + j)));
    for (int64_t j = 0; j < span; ++j) o[i + j] = round_to<T>(ob[j]);
  }
  for (; i < n; ++i) {
    const float x = f32(g[i]);
    const T s = round_to<T>(x / (1.0f + std::exp(-x)));
    o[i] = round_to<T>(f32(s) * f32(u[i]));
  }
}
#else
constexpr bool kSiluMulVectorized = false;

template <typename T>
void silu_mul_row(T* o, const T* g, const T* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = f32(g[i]);
    const T s = round_to<T>(x / (1.0f + std::exp(-x)));
    o[i] = round_to<T>(f32(s) * f32(u[i]));
  }
}
#endif

void silu_mul(torch::Tensor out, torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t rows = gate_up.size(0), n = gate_up.size(-1) / 2;
  TORCH_CHECK(gate_up.size(-1) == 2 * n, "gate_up: last dim must be even ([gate | up])");
  TORCH_CHECK(out.size(0) == rows && out.size(-1) == n && out.stride(-1) == 1 &&
              out.scalar_type() == gate_up.scalar_type(), "out: [rows, gate_up.size(-1) / 2] like gate_up");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t gs = gate_up.stride(0), os = out.stride(0);
    for_rows(rows, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* g = gp + r * gs;
        silu_mul_row(op + r * os, g, g + n, n);
      }
    });
  });
}

// x: [T, heads, D] rotated in place (head and row strides arbitrary, D contiguous);
// positions: int64 [T]; cos, sin: float32 [max_positions, D/2].
void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [T, heads, D] with a contiguous last dim");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == x.size(0),
              "positions: int64 [T]");
  const int64_t T = x.size(0), H = x.size(1), half = x.size(2) / 2;
  TORCH_CHECK(x.size(2) == 2 * half, "head_dim must be even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.dim() == 2 && cos.size(1) == half &&
              sin.sizes() == cos.sizes() && sin.is_contiguous() && sin.scalar_type() == at::kFloat,
              "cos, sin: float32 [max_positions, head_dim / 2]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t max_pos = cos.size(0);
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " out of range");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t ts = x.stride(0), hs = x.stride(1);
    for_rows(T, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float* ct = cp + pos[t] * half;
        const float* st = sp + pos[t] * half;
        for (int64_t h = 0; h < H; ++h) {
          scalar_t* x1 = xp + t * ts + h * hs;
          scalar_t* x2 = x1 + half;
          for (int64_t i = 0; i < half; ++i) {
            const float c = f32(round_to<scalar_t>(ct[i])), s = f32(round_to<scalar_t>(st[i]));
            const float a = f32(x1[i]), bb = f32(x2[i]);
            const float y1 = f32(round_to<scalar_t>(f32(round_to<scalar_t>(a * c)) - f32(round_to<scalar_t>(bb * s))));
            const float y2 = f32(round_to<scalar_t>(f32(round_to<scalar_t>(bb * c)) + f32(round_to<scalar_t>(a * s))));
            x1[i] = round_to<scalar_t>(y1);
            x2[i] = round_to<scalar_t>(y2);
          }
        }
      }
    });
  });
}

// dst: [R, W] (rows contiguous, any row stride); rows: int64 [2, T]; src: [T, 2, W] (W contiguous,
// any other strides). dst[rows[a][t]] = src[t][a]: the K (a = 0) and V (a = 1) of each new token into
// its KV slot, one row copy each (what index_put_ does, without its generic indexing machinery).
void write_kv_rows(torch::Tensor dst, torch::Tensor rows, torch::Tensor src) {
  TORCH_CHECK(dst.dim() == 2 && dst.stride(1) == 1, "dst must be [rows, width] with contiguous rows");
  TORCH_CHECK(src.dim() == 3 && src.size(1) == 2 && src.size(2) == dst.size(1) && src.stride(2) == 1,
              "src must be [T, 2, width] with a contiguous last dim");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "src and dst dtypes differ");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.size(0) == 2 && rows.size(1) == src.size(0),
              "rows must be int64 [2, T]");
  const int64_t T = src.size(0), R = dst.size(0);
  const int64_t bytes = dst.size(1) * dst.element_size();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t rs0 = rows.stride(0), rs1 = rows.stride(1);
  for (int64_t a = 0; a < 2; ++a)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = rp[a * rs0 + t * rs1];
      TORCH_CHECK(r >= 0 && r < R, "KV row ", r, " out of range [0, ", R, ")");
    }
  auto* dp = static_cast<char*>(dst.data_ptr());
  const auto* sp = static_cast<const char*>(src.data_ptr());
  const int64_t es = src.element_size(), ds0 = dst.stride(0) * dst.element_size();
  const int64_t ss0 = src.stride(0) * es, ss1 = src.stride(1) * es;
  for_rows(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t a = 0; a < 2; ++a) std::memcpy(dp + rp[a * rs0 + t * rs1] * ds0, sp + t * ss0 + a * ss1, bytes);
  });
}


// w[j] = -inf for the 32 j whose bit of m is 0: two masked stores on AVX-512, a blend per 8 on AVX2.
inline void mask_word(float* w, uint32_t m, float neg) {
#if defined(__AVX512F__)
  const __m512 n16 = _mm512_set1_ps(neg);
  _mm512_mask_storeu_ps(w, static_cast<__mmask16>(~m & 0xffffu), n16);
  _mm512_mask_storeu_ps(w + 16, static_cast<__mmask16>(~m >> 16), n16);
#elif defined(__AVX2__)
  const __m256 n8 = _mm256_set1_ps(neg);
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int j = 0; j < 32; j += 8) {
    const __m256i byte = _mm256_set1_epi32(static_cast<int>((m >> j) & 0xffu));
    const __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bits), lane_bits);   // all ones: allowed
    _mm256_storeu_ps(w + j, _mm256_blendv_ps(n8, _mm256_loadu_ps(w + j), _mm256_castsi256_ps(kept)));
  }
#else
  for (int j = 0; j < 32; ++j) w[j] = ((m >> j) & 1u) ? w[j] : neg;
#endif
}

// x: [n, V] float32 (rows contiguous, any row stride); bits: [n, W] int32, contiguous, 32 W >= V. Token t
// of row r stays when bit t % 32 of bits[r][t / 32] is set (llguidance's little-endian words); every
// other entry becomes -inf. Grammar masks are mostly whole words of 0 or of 1, so a word is tested
// before its bits are.
void mask_tokens_(torch::Tensor x, torch::Tensor bits) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat,
              "x must be float32 [rows, vocab] with contiguous rows");
  TORCH_CHECK(bits.dim() == 2 && bits.is_contiguous() && bits.scalar_type() == at::kInt && bits.size(0) == x.size(0)
              && 32 * bits.size(1) >= x.size(1), "bits must be contiguous int32 [rows, >= vocab / 32]");
  const int64_t V = x.size(1), W = bits.size(1), xs0 = x.stride(0);
  float* xp = x.data_ptr<float>();
  const auto* bp = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  const float neg = -std::numeric_limits<float>::infinity();
  // Rows in parallel from 4 up: a row of a 49k vocabulary is ~0.2 MB of writes when little is allowed.
  at::parallel_for(0, x.size(0), 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* row = xp + r * xs0;
      const uint32_t* words = bp + r * W;
      for (int64_t k = 0; 32 * k < V; ++k) {
        const uint32_t m = words[k];
        if (m == 0xffffffffu) continue;
        float* w = row + 32 * k;
        const int64_t n = std::min<int64_t>(32, V - 32 * k);
        if (m == 0) {
          std::fill(w, w + n, neg);
        } else if (n == 32) {
          mask_word(w, m, neg);
        } else {
          for (int64_t j = 0; j < n; ++j) w[j] = ((m >> j) & 1u) ? w[j] : neg;
        }
      }
    }
  });
}

}  // namespace

void register_fused_ops(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  // This module's copy of torch's lazy per-thread init (attention_ops.settle_threads_here).
  m.def("init_parallel", [] { at::internal::lazy_init_num_threads(); },
        "Settle the calling thread's torch thread count for this module's parallel loops");
  m.def("rms_norm", &rms_norm, "out = RMSNorm(x) * w (HF rounding)", release());
  m.def("add_rms_norm", &add_rms_norm, "residual += delta (in place); out = RMSNorm(residual) * w", release());
  // Whether silu_mul runs torch's vector exp here (else a scalar loop, slower than torch's ops).
  m.attr("silu_mul_vectorized") = pybind11::bool_(kSiluMulVectorized);
  m.def("silu_mul", &silu_mul, "out = silu(gate) * up for gate_up = [gate | up]", release());
  m.def("write_kv_rows", &write_kv_rows, "dst[rows[a][t]] = src[t][a]: new tokens' K and V into their slots",
        release());
  m.def("rope_", &rope_, "rotate [T, heads, D] in place by positions (HF rotate_half)", release());
  m.def("mask_tokens_", &mask_tokens_, "x[r][t] = -inf where bit t of bits[r] is 0 (a grammar's token mask)",
        release());
}
