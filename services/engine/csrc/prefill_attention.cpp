// Tandem: causal prefill attention in bfloat16 on AVX512-BF16 CPUs (one chunk over its context).
//
// Contract (checked here and in prefill_attention.py): q [Lq, H, D], k and v [ctx, Hkv, D], out
// [Lq, H, D], all bfloat16 with the last dim contiguous (any row and head strides: views of a fused
// QKV projection are fine); Lq <= ctx; H % Hkv == 0; D 64 or 128. Query i sits at position
// ctx - Lq + i and sees keys 0 .. its position.
//
// Why: torch's CPU flash kernel and the query-tiled batched matmuls both run QK^T in float32
// (torch's CPU bmm cannot take bf16 inputs into a float32 output), ~25 GFLOP/s per Zen 4 core,
// while vdpbf16ps multiplies bf16 pairs into float32 sums at several times that.
//
// How, per kv head (the G query heads sharing it are G rows per query position, one GEMM):
//   pack     K into vdpbf16ps's pair layout: for each block of 16 keys and each pair of dims
//            (2p, 2p+1), one 64-byte vector of 16 keys x that pair; V likewise with the pairs over
//            keys: for each key pair and 16 dims, one vector of 16 dims x (key 2j, key 2j+1).
//   scores   rows x keys, float32: 4 rows x 32 keys in 8 accumulators, each step one broadcast
//            query pair per row times two K vectors. Keys no row of the tile can see are skipped.
//   softmax  exact (two passes over the row's visible scores, held whole): m = max(s * scale),
//            p = exp(s * scale - m) rounded to bf16 (FlashAttention rounds P for its P.V matmul);
//            the row's sum is taken over the rounded p, so the weights used sum to one.
//   P.V      4 rows x 64 dims in 16 accumulators (2 x 128 for D = 128), each step one broadcast
//            (p[2j], p[2j+1]) pair per row times the key pair's V vectors; out = acc / sum, to bf16.
// Work items are (kv head, tile of query positions), ordered so that any contiguous run of items
// mixes early (short) and late (long) tiles: at::parallel_for hands each thread one run.
//
// AMX (Sapphire Rapids and later): the same packed layouts are AMX's bf16 tile layouts (a K block
// is a 16-pair x 16-key B tile; a V key-pair block x 16 dims is a B tile; the Q rows and the bf16 P
// rows are A tiles), so where the CPU has AMX-BF16 and Linux grants the tile state, the scores and
// P.V run as tile products of 16 rows at a time (tdpbf16ps: bf16 pairs summed in float32, the same
// arithmetic as vdpbf16ps up to the order of the float32 sums); the softmax stays the AVX-512 one.
// The AMX functions carry their own target attribute, so this one build runs on Zen 4 (no AMX:
// the vdpbf16ps path) and on AMX hosts alike; `prefill_attention_amx` says whether AMX is used.
// On a 2-core Xeon with AMX, 8 layers of `small`'s causal attention at 2048 tokens: 208 ms with
// vdpbf16ps (see prefill_attention.py for the AMX figures).
//
// Built into every variant of the kernel module; only the AVX512-BF16 build has the fast path
// (`prefill_attention_bf16` is False elsewhere and the Python side keeps its own paths).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TANDEM_PREFILL_BF16 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "pa_avx512.h"     // avx512::exp512
#else
#define TANDEM_PREFILL_BF16 0
#endif

namespace {

#if TANDEM_PREFILL_BF16

constexpr int64_t kKeyBlock = 16;     // keys per packed K vector
constexpr int64_t kRowTarget = 32;    // rows (query position x head of the group) per work item
constexpr int64_t kRowBlock = 4;      // rows per micro-kernel call

struct Shape {
  int64_t Lq, ctx, H, Hkv, G, D, start;
  int64_t q_row, q_head, k_row, k_head, v_row, v_head, o_row, o_head;   // strides in elements
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// K of kv head hk → dst [nkb][D/2][16 keys] of uint32 (a bf16 pair each); keys >= ctx are zero.
void pack_k(const uint16_t* k, const Shape& s, int64_t hk, int64_t nkb, uint32_t* dst) {
  const int64_t P = s.D / 2;
  const uint16_t* base = k + hk * s.k_head;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row_step = _mm512_set1_epi32(static_cast<int32_t>(s.k_row / 2));   // in uint32 units
  const __m512i rows = _mm512_mullo_epi32(lane, row_step);
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t key0 = kb * kKeyBlock;
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(kKeyBlock, s.ctx - key0));
    const __mmask16 mk = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
    const uint32_t* src = reinterpret_cast<const uint32_t*>(base + key0 * s.k_row);
    uint32_t* out = dst + kb * P * kKeyBlock;
    for (int64_t p = 0; p < P; ++p) {
      const __m512i w = n ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, rows, src + p, 4)
                          : _mm512_setzero_si512();
      _mm512_storeu_si512(out + p * kKeyBlock, w);
    }
  }
}

// V of kv head hk → dst [nkp][D/16][16 dims] of uint32: (v[2j][d], v[2j+1][d]); keys >= ctx are zero.
void pack_v(const uint16_t* v, const Shape& s, int64_t hk, int64_t nkp, uint32_t* dst) {
  const int64_t NV = s.D / 16;
  const uint16_t* base = v + hk * s.v_head;
  for (int64_t j = 0; j < nkp; ++j) {
    const int64_t k0 = 2 * j, k1 = 2 * j + 1;
    for (int64_t c = 0; c < NV; ++c) {
      const __m256i a = k0 < s.ctx ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + k0 * s.v_row + 16 * c))
                                   : _mm256_setzero_si256();
      const __m256i b = k1 < s.ctx ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + k1 * s.v_row + 16 * c))
                                   : _mm256_setzero_si256();
      const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(dst + (j * NV + c) * 16, w);
    }
  }
}

// scores[r][0, n_keys) for rows r0 .. r0 + 3 of qt ([rows][P] uint32 pairs); n_keys % 32 == 0.
template <int P>
inline void scores_block(const uint32_t* qt, const uint32_t* kp, int64_t n_keys, float* scores, int64_t ld) {
  for (int64_t kb = 0; kb < n_keys / kKeyBlock; kb += 2) {
    __m512 acc[kRowBlock][2];
    for (int r = 0; r < kRowBlock; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint32_t* k0 = kp + kb * P * kKeyBlock;
    const uint32_t* k1 = k0 + P * kKeyBlock;
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + p * kKeyBlock);
      const __m512bh b = (__m512bh)_mm512_loadu_si512(k1 + p * kKeyBlock);
      for (int r = 0; r < kRowBlock; ++r) {
        const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(qt[r * P + p]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, a);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, b);
      }
    }
    for (int r = 0; r < kRowBlock; ++r) {
      _mm512_storeu_ps(scores + r * ld + kb * kKeyBlock, acc[r][0]);
      _mm512_storeu_ps(scores + r * ld + kb * kKeyBlock + kKeyBlock, acc[r][1]);
    }
  }
}

// Softmax of one row in place: scores[0, visible) → bf16 p written to probs[0, n_pad) (zero past
// visible); returns the sum of the rounded p.
inline float softmax_row(const float* scores, int64_t visible, int64_t n_pad, float scale, uint16_t* probs) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < visible; j += 16) {
    const int64_t n = std::min<int64_t>(16, visible - j);
    const __mmask16 mk = static_cast<__mmask16>((1u << n) - 1u);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, scores + j), vscale);
    vmax = _mm512_mask_max_ps(vmax, mk, vmax, x);
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_pad; j += 16) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, visible - j));
    const __mmask16 mk = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
    const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, scores + j), vscale, m);
    const __m512 e = _mm512_maskz_mov_ps(mk, avx512::exp512<5>(x));
    const __m256bh pb = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), (__m256i)pb);
    vsum = _mm512_add_ps(vsum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)pb), 16)));
  }
  return _mm512_reduce_add_ps(vsum);
}

// acc rows r0 .. r0 + RB - 1: out[r][D] = sum_j p[r][j] v[j] over keys [0, n_keys), n_keys even.
template <int NV, int RB>
inline void pv_block(const uint16_t* probs, int64_t ld, const uint32_t* vp, int64_t n_keys, __m512 (&acc)[RB][NV]) {
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_keys / 2; ++j) {
    __m512bh vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vp + (j * NV + c) * 16);
    for (int r = 0; r < RB; ++r) {
      int32_t pair;
      std::memcpy(&pair, probs + r * ld + 2 * j, sizeof(pair));
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
    }
  }
}

template <int D>
void run_item(const uint16_t* q, uint16_t* out, const Shape& s, float scale, int64_t hk, int64_t t0, int64_t t1,
              const uint32_t* kp, const uint32_t* vp, std::vector<uint32_t>& qt_buf, std::vector<float>& score_buf,
              std::vector<uint16_t>& prob_buf) {
  constexpr int P = D / 2, NV = D / 16, RB = NV <= 4 ? 4 : 2;
  static_assert(kRowBlock % RB == 0, "row blocks of P.V must tile the score row blocks");
  const int64_t G = s.G;
  const int64_t rows = (t1 - t0) * G, rows_pad = round_up(rows, kRowBlock);
  const int64_t see = s.start + t1;                          // keys visible to the tile's last query
  const int64_t n_keys = round_up(see, 2 * kKeyBlock);       // scores computed (multiple of 32)
  qt_buf.assign(rows_pad * P, 0u);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < G; ++g)
      std::memcpy(qt_buf.data() + ((t - t0) * G + g) * P, q + t * s.q_row + (hk * G + g) * s.q_head, D * 2);
  score_buf.resize(rows_pad * n_keys);
  prob_buf.resize(rows_pad * n_keys);
  for (int64_t r0 = 0; r0 < rows_pad; r0 += kRowBlock)
    scores_block<P>(qt_buf.data() + r0 * P, kp, n_keys, score_buf.data() + r0 * n_keys, n_keys);
  std::vector<float> inv(rows_pad, 0.0f);
  for (int64_t r = 0; r < rows_pad; ++r) {
    const int64_t visible = r < rows ? s.start + t0 + r / G + 1 : 0;
    const float sum = softmax_row(score_buf.data() + r * n_keys, visible, n_keys, scale, prob_buf.data() + r * n_keys);
    inv[r] = visible ? 1.0f / sum : 0.0f;
  }
  for (int64_t r0 = 0; r0 < rows_pad; r0 += RB) {
    // keys past the last visible one of these rows hold p = 0: stop at the block's last row's limit
    const int64_t last = std::min(r0 + RB, rows) - 1;
    if (last < r0) break;
    const int64_t keys = round_up(s.start + t0 + last / G + 1, 2);
    __m512 acc[RB][NV];
    pv_block<NV, RB>(prob_buf.data() + r0 * n_keys, n_keys, vp, keys, acc);
    for (int r = 0; r < RB && r0 + r < rows; ++r) {
      const int64_t t = t0 + (r0 + r) / G, g = (r0 + r) % G;
      uint16_t* o = out + t * s.o_row + (hk * G + g) * s.o_head;
      const __m512 f = _mm512_set1_ps(inv[r0 + r]);
      for (int c = 0; c < NV; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], f)));
    }
  }
}


// ------------------------------------------------------------------------------------------ AMX

#define TANDEM_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
constexpr int64_t kAmxRows = 16;      // rows of an A/C tile: query rows per tile product

// Whether this CPU has AMX-TILE and AMX-BF16 and Linux lets this process use the tile state
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; process-wide, asked once).
bool amx_usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;        // AMX-BF16, AMX-TILE
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes (16 float32 / 32 bf16 / 16 bf16 pairs): one config for both phases.
TANDEM_AMX_TARGET void amx_begin() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
  // gcc's _tile_loadconfig tells the compiler it reads 8 bytes of cfg: make the whole struct's
  // stores happen first, or they are dropped as dead and the tiles stay unconfigured (SIGILL)
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

TANDEM_AMX_TARGET void amx_end() { _tile_release(); }

// scores[16][n_keys] (row stride ld floats) for the 16 rows of qt ([16][P] bf16 pairs) against the
// packed K (pack_k); n_keys % 32 == 0. Tiles: 0, 3 scores of two key blocks; 1, 2 K; 4-7 Q.
template <int D>
TANDEM_AMX_TARGET void amx_scores(const uint32_t* qt, const uint32_t* kp, int64_t n_keys, float* scores, int64_t ld) {
  constexpr int P = D / 2;
  constexpr int64_t kTile = 16 * 16;           // uint32 in one packed 16-pair x 16-key tile
  _tile_loadd(4, qt, P * 4);
  _tile_loadd(5, qt + 16, P * 4);
  if constexpr (D == 128) {
    _tile_loadd(6, qt + 32, P * 4);
    _tile_loadd(7, qt + 48, P * 4);
  }
  for (int64_t kb = 0; kb < n_keys / kKeyBlock; kb += 2) {
    const uint32_t* k0 = kp + kb * P * kKeyBlock;
    const uint32_t* k1 = k0 + P * kKeyBlock;
    _tile_zero(0);
    _tile_zero(3);
    _tile_loadd(1, k0, 64);
    _tile_loadd(2, k1, 64);
    _tile_dpbf16ps(0, 4, 1);
    _tile_dpbf16ps(3, 4, 2);
    _tile_loadd(1, k0 + kTile, 64);
    _tile_loadd(2, k1 + kTile, 64);
    _tile_dpbf16ps(0, 5, 1);
    _tile_dpbf16ps(3, 5, 2);
    if constexpr (D == 128) {
      _tile_loadd(1, k0 + 2 * kTile, 64);
      _tile_loadd(2, k1 + 2 * kTile, 64);
      _tile_dpbf16ps(0, 6, 1);
      _tile_dpbf16ps(3, 6, 2);
      _tile_loadd(1, k0 + 3 * kTile, 64);
      _tile_loadd(2, k1 + 3 * kTile, 64);
      _tile_dpbf16ps(0, 7, 1);
      _tile_dpbf16ps(3, 7, 2);
    }
    _tile_stored(0, scores + kb * kKeyBlock, ld * 4);
    _tile_stored(3, scores + (kb + 1) * kKeyBlock, ld * 4);
  }
}

// out[16][D] float32 = P[16][n_keys] . V over the packed V (pack_v); n_keys % 32 == 0, probs row
// stride ld. Tiles: 0-3 four 16-dim column blocks of out; 4 P; 5-7 V.
template <int D>
TANDEM_AMX_TARGET void amx_pv(const uint16_t* probs, int64_t ld, const uint32_t* vp, int64_t n_keys, float* out) {
  constexpr int NV = D / 16;
  constexpr int64_t kRow = NV * 16;            // uint32 between a V tile's rows (one key pair)
  for (int c = 0; c < NV; c += 4) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t jb = 0; jb < n_keys / 32; ++jb) {
      const uint32_t* vb = vp + jb * 16 * kRow + c * 16;
      _tile_loadd(4, probs + jb * 32, ld * 2);
      _tile_loadd(5, vb, kRow * 4);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, vb + 16, kRow * 4);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, vb + 32, kRow * 4);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, vb + 48, kRow * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, out + c * 16, D * 4);
    _tile_stored(1, out + (c + 1) * 16, D * 4);
    _tile_stored(2, out + (c + 2) * 16, D * 4);
    _tile_stored(3, out + (c + 3) * 16, D * 4);
  }
}

// run_item with the tile products: rows padded to 16, then per 16 rows: scores, softmax, P.V.
// Called between amx_begin and amx_end on this thread.
template <int D>
void run_item_amx(const uint16_t* q, uint16_t* out, const Shape& s, float scale, int64_t hk, int64_t t0, int64_t t1,
                  const uint32_t* kp, const uint32_t* vp, std::vector<uint32_t>& qt_buf, std::vector<float>& score_buf,
                  std::vector<uint16_t>& prob_buf) {
  constexpr int P = D / 2, NV = D / 16;
  const int64_t G = s.G;
  const int64_t rows = (t1 - t0) * G, rows_pad = round_up(rows, kAmxRows);
  const int64_t n_keys = round_up(s.start + t1, 2 * kKeyBlock);
  qt_buf.assign(rows_pad * P, 0u);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < G; ++g)
      std::memcpy(qt_buf.data() + ((t - t0) * G + g) * P, q + t * s.q_row + (hk * G + g) * s.q_head, D * 2);
  score_buf.resize(kAmxRows * n_keys + kAmxRows * D);
  prob_buf.resize(kAmxRows * n_keys);
  float* scores = score_buf.data();
  float* acc = scores + kAmxRows * n_keys;
  for (int64_t r0 = 0; r0 < rows; r0 += kAmxRows) {
    const int64_t last = std::min(r0 + kAmxRows, rows) - 1;
    const int64_t keys = round_up(s.start + t0 + last / G + 1, 2 * kKeyBlock);   // what these rows may see
    amx_scores<D>(qt_buf.data() + r0 * P, kp, keys, scores, n_keys);
    float inv[kAmxRows];
    for (int64_t r = 0; r < kAmxRows; ++r) {
      const int64_t visible = r0 + r < rows ? s.start + t0 + (r0 + r) / G + 1 : 0;
      const float sum = softmax_row(scores + r * n_keys, visible, keys, scale, prob_buf.data() + r * n_keys);
      inv[r] = visible ? 1.0f / sum : 0.0f;
    }
    amx_pv<D>(prob_buf.data(), n_keys, vp, keys, acc);
    for (int64_t r = 0; r < kAmxRows && r0 + r < rows; ++r) {
      const int64_t t = t0 + (r0 + r) / G, g = (r0 + r) % G;
      uint16_t* o = out + t * s.o_row + (hk * G + g) * s.o_head;
      const __m512 f = _mm512_set1_ps(inv[r]);
      for (int c = 0; c < NV; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 16 * c), f)));
    }
  }
}

template <int D>
void run(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, const Shape& s, float scale, bool amx) {
  const int64_t P = D / 2, NV = D / 16;
  const int64_t nkb = round_up(round_up(s.ctx, kKeyBlock) / kKeyBlock, 2);   // even: scores go 32 keys at a time
  const int64_t nkp = nkb * kKeyBlock / 2;
  const int64_t k_per_head = nkb * P * kKeyBlock, v_per_head = nkp * NV * 16;
  std::vector<uint32_t> kp(s.Hkv * k_per_head), vp(s.Hkv * v_per_head);
  at::parallel_for(0, s.Hkv, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t hk = h0; hk < h1; ++hk) {
      pack_k(k, s, hk, nkb, kp.data() + hk * k_per_head);
      pack_v(v, s, hk, nkp, vp.data() + hk * v_per_head);
    }
  });
  const int64_t tile = std::max<int64_t>(1, kRowTarget / s.G);
  const int64_t n_tiles = (s.Lq + tile - 1) / tile;
  at::parallel_for(0, s.Hkv * n_tiles, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint32_t> qt;
    std::vector<float> scores;
    std::vector<uint16_t> probs;
    if (amx) amx_begin();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t hk = i / n_tiles, j = i % n_tiles;
      const int64_t tix = j % 2 == 0 ? j / 2 : n_tiles - 1 - j / 2;     // 0, n-1, 1, n-2, ...: short and long mixed
      const int64_t t0 = tix * tile, t1 = std::min(s.Lq, t0 + tile);
      if (amx)
        run_item_amx<D>(q, out, s, scale, hk, t0, t1, kp.data() + hk * k_per_head, vp.data() + hk * v_per_head, qt,
                        scores, probs);
      else
        run_item<D>(q, out, s, scale, hk, t0, t1, kp.data() + hk * k_per_head, vp.data() + hk * v_per_head, qt,
                    scores, probs);
    }
    if (amx) amx_end();
  });
}

#endif  // TANDEM_PREFILL_BF16

void prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                       bool use_amx) {
#if TANDEM_PREFILL_BF16
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.dim() == 3, "q, k, v, out must be 3-D");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16, "prefill_attention: CPU bfloat16 tensors");
    TORCH_CHECK(t->stride(2) == 1, "prefill_attention: the last dim must be contiguous");
  }
  Shape s{q.size(0), k.size(0), q.size(1), k.size(1), 0, q.size(2), 0,
          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1)};
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(v.sizes() == k.sizes() && out.sizes() == q.sizes() && k.size(2) == s.D, "shape mismatch");
  TORCH_CHECK(s.Lq <= s.ctx, "more queries than context");
  TORCH_CHECK(s.D == 64 || s.D == 128, "head_dim must be 64 or 128");
  TORCH_CHECK(s.k_row % 2 == 0 && s.k_head % 2 == 0, "k strides must be even (pairs are read as 32-bit words)");
  s.G = s.H / s.Hkv;
  s.start = s.ctx - s.Lq;
  if (s.Lq == 0) return;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool amx = use_amx && amx_usable();
  if (s.D == 64) run<64>(qp, kp, vp, op, s, static_cast<float>(scale), amx);
  else run<128>(qp, kp, vp, op, s, static_cast<float>(scale), amx);
#else
  (void)use_amx;
  TORCH_CHECK(false, "prefill_attention needs the avx512_bf16 build of the kernel module");
#endif
}

bool prefill_amx() {
#if TANDEM_PREFILL_BF16
  return amx_usable();
#else
  return false;
#endif
}

}  // namespace

void register_prefill_attention(pybind11::module& m) {
  m.def("prefill_attention", &prefill_attention,
        "Causal bf16 prefill attention of one chunk (writes out); see prefill_attention.cpp",
        py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("use_amx") = true,
        py::call_guard<py::gil_scoped_release>());
  m.attr("prefill_attention_bf16") = static_cast<bool>(TANDEM_PREFILL_BF16);
  // AMX tile products where the CPU has them and Linux grants the tile state (else vdpbf16ps)
  m.attr("prefill_attention_amx") = prefill_amx();
}
