// Tandem paged decode attention: the three-pass work item shared by the vector paths (AVX-512,
// AVX2). The ISA-specific parts come from a kernel type K (see Avx512Kernel, Avx2Kernel):
//
//   K::kTokens                       tokens per scores() call (the vector width in floats)
//   K(D)                             per-head-dim constants (chunk counts, tail masks)
//   k.q_floats() / k.acc_floats()    scratch floats per query head for q / the accumulator
//   k.prep_q(q, qs)                  q row -> the layout scores() reads (64-byte aligned)
//   k.scores(qs, kb, rs, n, scale, s)  s[t] = scale * q . k[t] for n (1..kTokens) rows at kb
//   K::softmax(s, len)               s <- exp(s - max s) in place; returns the sum
//   k.values(G, p, lds, vb, rs, n, acc, ldq)  acc[g] += sum_t p[g][t] v[t] over one block
//   k.acc_index(d)                   where element d of a head lives in its accumulator
//
// Private to paged_attention.cpp; x86 only (software prefetch).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pa_common.h"

#ifndef TANDEM_PF_DIST
#define TANDEM_PF_DIST 2  // how many blocks ahead to prefetch K/V rows
#endif
#ifndef TANDEM_PF_HINT
#define TANDEM_PF_HINT _MM_HINT_T0
#endif

namespace {

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
template <typename K, typename T>
void item_vec(const Params& p, const T* q, T* out, const T* kc, const T* vc, int64_t b, int64_t h0,
              int64_t nh, std::vector<float>& scratch) {
  const int64_t G = p.G, D = p.D, NH = nh * G;  // NH query heads in this item
  const int64_t len = p.seq_lens[b];
  const T* qrow = q + (b * p.H + h0 * G) * D;
  T* orow = out + (b * p.H + h0 * G) * D;
  if (len <= 0) {
    for (int64_t i = 0; i < NH * D; ++i) store_out(orow + i, 0.0f);
    return;
  }
  const K k(D);
  const int64_t qld = k.q_floats(), ldq = k.acc_floats();
  const int64_t lds = (len + 15) / 16 * 16;

  // Per-thread scratch, reused across items and calls (only grows): q, accumulators,
  // scores / probabilities, 1 / softmax sums. 64-byte aligned for the q loads.
  const size_t need = static_cast<size_t>(NH * (qld + ldq + lds + 1) + 16);
  if (scratch.size() < need) scratch.resize(need);
  float* qs = scratch.data() + ((64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64) / sizeof(float);
  float* acc = qs + NH * qld;
  float* s = acc + NH * ldq;  // [NH][lds]
  float* inv = s + NH * lds;
  for (int64_t h = 0; h < NH; ++h) k.prep_q(qrow + h * D, qs + h * qld);
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
      for (int64_t t0 = 0; t0 < nt; t0 += K::kTokens) {
        const int n = static_cast<int>(std::min<int64_t>(K::kTokens, nt - t0));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = j * G + g;
          k.scores(qs + h * qld, kb + j * D + t0 * rs, rs, n, p.scale, s + h * lds + i * bs + t0);
        }
      }
    }
  }
  for (int64_t h = 0; h < NH; ++h) inv[h] = 1.0f / K::softmax(s + h * lds, len);
  for (int64_t i = 0; i < nblk; ++i) {
    const T* vb = vc + bt[i] * p.v_stride0 + h0 * D;
    for (int64_t j = 0; j < nh; ++j) {
      prefetch(vc, p.v_stride0, i + TANDEM_PF_DIST, j);
      k.values(G, s + j * G * lds + i * bs, lds, vb + j * D, rs, static_cast<int>(ntok(i)), acc + j * G * ldq, ldq);
    }
  }
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t d = 0; d < D; ++d) store_out(orow + h * D + d, acc[h * ldq + k.acc_index(d)] * inv[h]);
}

}  // namespace
