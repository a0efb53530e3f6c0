// Tandem paged decode attention: the work item shared by the vector paths (AVX-512, AVX2).
//
// One pass over the item's tokens, 16 at a time (a "group"), with an online softmax: for each
// group and kv head, K rows -> 16 scores per query head (all G query heads that share the kv
// head) -> running max / sum update -> p . V into float32 accumulators, while that group's K and
// V rows are in L1. K and V of a block are read once, back to back (in the engine's cache they
// are adjacent: [num_blocks, num_layers, 2, block_size, Hkv, D]); no per-token score scratch.
// The running max is lazy: it moves (and the accumulators are rescaled) only when a score passes
// it by more than kMaxSlack, so p <= e^8 and a group normally costs one compare, no horizontal max.
//
// The ISA-specific parts come from a kernel type K (Avx512Kernel, Avx2Kernel):
//   K::kTokens                          16, the tokens of one group
//   K(D)                                per-head-dim constants (chunk counts, tail masks)
//   k.q_floats() / k.acc_floats()       scratch floats per query head for q / the accumulator
//   k.prep_q(q, qs)                     q row -> the layout the dot products read (64-byte aligned)
//   k.pack_q(qs, qld, NH, G)            then, for all the item's query heads: any cross-head packing
//   k.group(nh, G, qs, qld, kr, vr, hoff0, n, scale, st, lds, xb, tick)
//       the item's nh kv heads (row offsets hoff0 + j * D) over n (1..16) tokens whose rows start
//       at kr[t] / vr[t] (rows t >= n repeat row 0: valid memory, weight 0): updates the nh * G
//       query heads' states; xb is 16 floats of scratch per query head; tick(i, 2 nh) runs 2 nh
//       times, i = 0, 1, ...: before each kv head's K is read and before each one's p . V
//   k.finish(acc, f, o)                 o[d] = f * (element d of accumulator acc), d < D (T or float o)
// A head's state (lds floats, 64-byte aligned): acc[acc_floats] | l[16] (per-lane softmax sums,
// added up at the end) | m (the running max) and padding to 16 floats.
//
// Items cover tokens [t0, t1) of one row's kv heads [h0, h0 + nh) (see run()); an item that
// covers a whole row writes the normalised output, one that covers a partition of a long row
// writes (m, l, acc) for merge_partials().
// Private to paged_attention.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <immintrin.h>

#include "pa_common.h"

namespace {

// Software prefetch of K/V rows, kPf token groups ahead, into L2, spread evenly over the group's
// 2 nh ticks (before each kv head's scores and before each one's p . V). Measured on Zen 4 (bf16,
// D 64, 8 kv heads, GB/s of KV read, one thread): none 9-10, 2 groups ahead 12-13, 1 or 2 ahead
// spread over the K ticks only 12-13, over the K and the V ticks 14-15, also over the softmax
// heads no better; one prefetch per 128 bytes (leaning on the adjacent-line prefetcher) 12; into
// L1 (T0) no better than none: a DRAM-latency prefetch holds an L1 miss buffer too long.
// Bursts of prefetches stall the core once its miss buffers are full, so smaller bursts overlap
// the reads with the arithmetic better.
#ifndef TANDEM_PF_GROUPS
#define TANDEM_PF_GROUPS 1  // 0: none
#endif
#ifndef TANDEM_PF_HINT
#define TANDEM_PF_HINT _MM_HINT_T1
#endif

constexpr float kMaxSlack = 8.0f;  // the running max moves only when a score passes it by more

template <typename K, typename T>
void item_vec(const Params& p, const T* q, T* out, const T* kc, const T* vc, const Item& it,
              std::vector<float>& scratch) {
  constexpr int kT = K::kTokens;
  const int64_t G = p.G, D = p.D, NH = it.nh * G;
  const int64_t len = std::min<int64_t>(p.seq_lens[it.b], it.t1);
  const T* qrow = q + (it.b * p.H + it.h0 * G) * D;
  T* orow = out + (it.b * p.H + it.h0 * G) * D;
  if (it.t0 >= len) {  // an empty row (partitions are never empty)
    for (int64_t i = 0; i < NH * D; ++i) store_out(orow + i, 0.0f);
    return;
  }
  const K k(D);
  const int64_t qld = k.q_floats(), accf = k.acc_floats(), lds = accf + 2 * kT;

  // Per-thread scratch, reused across items and calls (it only grows). 64-byte aligned.
  const size_t need = static_cast<size_t>(NH * (qld + lds + kT) + 16);
  if (scratch.size() < need) scratch.resize(need);
  float* qs = scratch.data() + ((64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64) / sizeof(float);
  float* st = qs + NH * qld;
  float* xb = st + NH * lds;  // per query head: one group's scores, then p
  for (int64_t h = 0; h < NH; ++h) {
    k.prep_q(qrow + h * D, qs + h * qld);
    float* s = st + h * lds;
    std::memset(s, 0, sizeof(float) * (accf + 2 * kT));
    s[accf + kT] = -std::numeric_limits<float>::infinity();
  }
  k.pack_q(qs, qld, NH, G);

  const int32_t* bt = p.block_tables + it.b * p.bt_stride0;
  const int64_t bs = p.block_size, rs = p.row_stride;
  // Row pointers of the tokens [t, t + n) (n <= kT), walking the block table.
  auto rows = [&](int64_t t, int n, const T** kr, const T** vr) {
    int64_t bi = t / bs, off = t - bi * bs;
    const T* kb = kc + bt[bi] * p.k_stride0;
    const T* vb = vc + bt[bi] * p.v_stride0;
    for (int i = 0; i < n; ++i, ++off) {
      if (off == bs) {  // only when token t + i exists, so bt[bi + 1] is a block of this row
        ++bi, off = 0;
        kb = kc + bt[bi] * p.k_stride0;
        vb = vc + bt[bi] * p.v_stride0;
      }
      kr[i] = kb + off * rs;
      vr[i] = vb + off * rs;
    }
  };
  // Software prefetch of the group kPf ahead: its K rows, then its V rows, each row's slice of
  // this item's heads in address order, spread over the current group's kv heads (the hardware
  // prefetcher alone does poorly here: the heads walk each block at a row stride).
  constexpr int kPf = TANDEM_PF_GROUPS;
  const int64_t slice = it.nh * D * static_cast<int64_t>(sizeof(T));   // bytes of a row this item reads
  const T* pk[2 * kT];  // K rows then V rows of the group being prefetched
  int prow = 0, pend = 0;  // next row to prefetch, rows in all (2 * its tokens)
  auto pf_start = [&](int64_t t) {
    const int pn = t < len ? static_cast<int>(std::min<int64_t>(kT, len - t)) : 0;
    if (pn) rows(t, pn, pk, pk + pn);
    prow = 0, pend = 2 * pn;
  };
  auto pf_some = [&](int upto) {  // rows [prow, upto)
    for (; prow < upto; ++prow) {
      const char* r = reinterpret_cast<const char*>(pk[prow] + it.h0 * D);
      const char* e = r + slice;
      r -= reinterpret_cast<uintptr_t>(r) % 64;
      for (; r < e; r += 64) _mm_prefetch(r, TANDEM_PF_HINT);
    }
  };
  if (kPf > 0)
    for (int i = 1; i < kPf; ++i) pf_start(it.t0 + i * kT), pf_some(pend);

  const T* kr[kT];
  const T* vr[kT];
  for (int64_t t = it.t0; t < len; t += kT) {
    const int n = static_cast<int>(std::min<int64_t>(kT, len - t));
    rows(t, n, kr, vr);
    for (int i = n; i < kT; ++i) kr[i] = kr[0], vr[i] = vr[0];
    if (kPf > 0) pf_start(t + kPf * kT);
    k.group(it.nh, G, qs, qld, kr, vr, it.h0 * D, n, p.scale, st, lds, xb, [&](int64_t i, int64_t of) {
      if (kPf > 0) pf_some(static_cast<int>(pend * (i + 1) / of));
    });
  }

  for (int64_t h = 0; h < NH; ++h) {
    const float* acc = st + h * lds;
    float l = 0.0f;
    for (int i = 0; i < kT; ++i) l += acc[accf + i];
    if (it.partial) {
      float* o = it.partial + h * (D + 2);
      o[0] = acc[accf + kT];
      o[1] = l;
      k.finish(acc, 1.0f, o + 2);
    } else {
      k.finish(acc, 1.0f / l, orow + h * D);
    }
  }
}

}  // namespace
