// Tandem: CPU paged-attention decode kernel.
//
// One query token per sequence attends over that sequence's K/V, which live in
// fixed-size blocks of a shared paged cache. Work item = tokens [t0, t1) of one sequence's kv
// heads (all of them unless the batch is small; long sequences are split into partitions of
// kPartitionTokens), see run(). The vector paths (pa_vector_item.h) make one pass over the
// item's tokens, 16 at a time, with an online softmax: scores for all query heads of the item
// (K read in place), the running max / sum update, then p . V (V read in place), while the 16
// tokens' K and V rows are in L1; the next groups' rows are prefetched in software. All `group`
// query heads sharing a kv head are processed together, so each K/V row is read from memory
// once. Accumulation is float32 for both bf16 and fp32.
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
// Variants: attention_ops.py builds this one file into one module per ISA, with explicit
// flags (never -march=native), and loads the best one the CPU runs. The flags decide which
// vector path is compiled in (the module's `simd` says which):
//   avx512_bf16  AVX-512F/BW/VL + AVX512-BF16 (vdpbf16ps: q.k, and p.V   pa_avx512.h
//                over token pairs with p rounded to bf16)
//   avx512       AVX-512F/BW/VL (bf16 widened with shifts)                pa_avx512.h
//   avx2         AVX2 + FMA, 8-float vectors                             pa_avx2.h
//   scalar       no vector path; any CPU                                  pa_scalar.h
// The portable scalar path (online softmax, one token at a time) is compiled into every
// variant and exported as `paged_decode_attention_scalar`, the reference the tests hold the
// vector paths to; in the `scalar` build it is also `paged_decode_attention`.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "pa_common.h"
#include "pa_scalar.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TANDEM_HAVE_AVX512 1
#include "pa_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#define TANDEM_HAVE_AVX2 1
#include "pa_avx2.h"
#endif

#if defined(TANDEM_HAVE_AVX512) && defined(__AVX512BF16__)
#define TANDEM_SIMD "avx512_bf16"
#elif defined(TANDEM_HAVE_AVX512)
#define TANDEM_SIMD "avx512"
#elif defined(TANDEM_HAVE_AVX2)
#define TANDEM_SIMD "avx2"
#else
#define TANDEM_SIMD "scalar"
#endif

namespace {

#if defined(TANDEM_HAVE_AVX512) || defined(TANDEM_HAVE_AVX2)
constexpr bool kHaveVectorPath = true;
#else
constexpr bool kHaveVectorPath = false;
#endif

// One work item on this build's vector path (never called in the scalar build).
template <typename T>
inline void item_simd(const Params& p, const T* q, T* out, const T* kc, const T* vc, const Item& it,
                      std::vector<float>& scratch) {
#if defined(TANDEM_HAVE_AVX512)
  item_avx512<T>(p, q, out, kc, vc, it, scratch);
#elif defined(TANDEM_HAVE_AVX2)
  item_avx2<T>(p, q, out, kc, vc, it, scratch);
#else
  (void)p, (void)q, (void)out, (void)kc, (void)vc, (void)it, (void)scratch;
#endif
}

// Rows longer than this are split into partitions of this many tokens (a multiple of every
// kernel's token group), computed as separate items and merged (log-sum-exp) at the end, so a
// small batch of long rows still feeds every thread. Fixed, never a function of the thread count:
// the output does not depend on how many threads ran.
constexpr int64_t kPartitionTokens = 512;

// The portable path: one item per (row, kv head); the `scalar` build and the tests' reference.
template <typename T>
void run_scalar(const Params& p, const T* q, T* out, const T* kc, const T* vc) {
  const int64_t items = p.B * p.Hkv;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t it = begin; it < end; ++it) item_scalar<T>(p, q, out, kc, vc, it / p.Hkv, it % p.Hkv, scratch);
  });
}

// Work items: (row, partition, chunk of kv heads). Rows are split into kv-head chunks only when
// there are fewer than 4 (row, partition) pairs per thread (small batches), so every thread
// still gets several items; threads take items dynamically from a shared counter, which
// balances ragged seq_lens. Each kv head's result is computed the same way whatever the chunking
// or thread, so the output is thread-count invariant.
template <typename T>
void run(const Params& p, const T* q, T* out, const T* kc, const T* vc, bool force_scalar) {
  if (force_scalar || !kHaveVectorPath) return run_scalar<T>(p, q, out, kc, vc);
  const int64_t nthreads = at::get_num_threads();
  // Per calling thread, reused across calls (they only grow).
  thread_local std::vector<Item> items;
  thread_local std::vector<float> partials;
  int64_t pairs = 0, partial_heads = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t np = (p.seq_lens[b] + kPartitionTokens - 1) / kPartitionTokens;
    pairs += std::max<int64_t>(np, 1);
    if (np > 1) partial_heads += np * p.H;
  }
  int64_t split = 1;
  if (pairs < 4 * nthreads) split = std::min<int64_t>(p.Hkv, (4 * nthreads + pairs - 1) / pairs);
  const int64_t hpc = (p.Hkv + split - 1) / split;  // kv heads per item
  split = (p.Hkv + hpc - 1) / hpc;
  const size_t part_floats = static_cast<size_t>(partial_heads * (p.D + 2));
  if (partials.size() < part_floats) partials.resize(part_floats);
  items.clear();
  float* next_partial = partials.data();
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t len = p.seq_lens[b];
    const int64_t np = std::max<int64_t>((len + kPartitionTokens - 1) / kPartitionTokens, 1);
    for (int64_t part = 0; part < np; ++part) {
      float* partial = np > 1 ? next_partial + part * p.H * (p.D + 2) : nullptr;
      for (int64_t c = 0; c < split; ++c) {
        const int64_t h0 = c * hpc;
        items.push_back({b, h0, std::min(hpc, p.Hkv - h0), part * kPartitionTokens,
                         np > 1 ? std::min(len, (part + 1) * kPartitionTokens) : len,
                         partial ? partial + h0 * p.G * (p.D + 2) : nullptr});
      }
    }
    if (np > 1) next_partial += np * p.H * (p.D + 2);
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const Item* item = items.data();  // `items` in the lambda would name the worker's own thread_local
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nthreads, n_items), 1, [&](int64_t, int64_t) {
    thread_local std::vector<float> scratch;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;)
      item_simd<T>(p, q, out, kc, vc, item[i], scratch);
  });
  if (partial_heads == 0) return;
  // Merge each partitioned row's partial results: out = sum_i w_i acc_i / sum_i w_i l_i with
  // w_i = exp(m_i - max_i m_i).
  const float* part = partials.data();
  thread_local std::vector<float> w, acc;
  acc.resize(p.D);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t np = (p.seq_lens[b] + kPartitionTokens - 1) / kPartitionTokens;
    if (np <= 1) continue;
    w.resize(np);
    const int64_t hs = p.H * (p.D + 2);  // floats between a head's results in consecutive partitions
    for (int64_t h = 0; h < p.H; ++h) {
      const float* ph = part + h * (p.D + 2);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < np; ++i) m = std::max(m, ph[i * hs]);
      float l = 0.0f;
      for (int64_t i = 0; i < np; ++i) w[i] = std::exp(ph[i * hs] - m), l += w[i] * ph[i * hs + 1];
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t i = 0; i < np; ++i)
        for (int64_t d = 0; d < p.D; ++d) acc[d] += w[i] * ph[i * hs + 2 + d];
      const float inv = 1.0f / l;
      T* o = out + (b * p.H + h) * p.D;
      for (int64_t d = 0; d < p.D; ++d) store_out(o + d, acc[d] * inv);
    }
    part += np * p.H * (p.D + 2);
  }
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

void register_fused_ops(pybind11::module& m);   // fused_ops.cpp: the decoder's elementwise ops
void register_prefill_attention(pybind11::module& m);   // prefill_attention.cpp: causal bf16 prefill attention

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_fused_ops(m);
  register_prefill_attention(m);
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention (writes out); see paged_attention.cpp for layouts",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention_scalar", &paged_decode_attention_scalar,
        "Same as paged_decode_attention but always uses the portable scalar path (the tests' reference)",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.attr("simd") = TANDEM_SIMD;
}
