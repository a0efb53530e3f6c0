// Tandem paged decode attention: what every variant shares (parameters, bf16 <-> float).
// Private to paged_attention.cpp (one translation unit per variant module), hence the
// anonymous namespace.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

using bf16_bits = uint16_t;

inline float bf16_to_float(bf16_bits h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round-to-nearest-even, NaN kept quiet (same as torch's conversion). Branch-free, so loops of
// it vectorise.
inline bf16_bits float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet = (u >> 16) | 0x40u;
  return static_cast<bf16_bits>((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
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

// One unit of work (see run()): tokens [t0, t1) of row b, kv heads [h0, h0 + nh). partial null:
// the item covers the whole row and writes out; else it writes, for each of its nh * G query
// heads, (running max m, softmax sum l, unnormalised acc[D]) at partial + head * (D + 2).
struct Item {
  int64_t b, h0, nh, t0, t1;
  float* partial;
};

}  // namespace
