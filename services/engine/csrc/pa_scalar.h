// Tandem paged decode attention: the portable scalar path (every variant; the only one in the
// `scalar` build). Online softmax, one token at a time: the readable reference for the vector
// paths' results, not a fast path. Private to paged_attention.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "pa_common.h"

namespace {

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

}  // namespace
