// Host helpers for the MXINT4 weight format and bf16 bits, used by the references and tests.
//
// Packing (DESIGN.md): a row of K int4 values is K/2 bytes; byte b holds k = 2b in its low
// nibble and k = 2b + 1 in its high nibble, two's complement (-8..7). One bf16 scale covers 32
// consecutive k. Example: values {3, -2} pack to 0xE3 (low 0x3, high 0xE = -2).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace moejit::ref {

constexpr int kGroupSize = 32;  // k values per MXINT4 scale

// bf16 bits -> float (exact).
inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float -> bf16 bits, round to nearest even; NaN stays NaN (quiet, sign kept), +-Inf stays Inf,
// overflow rounds to Inf as IEEE does.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

// Rounds a float to the nearest bf16 value (returned as float).
inline float round_to_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// Signed value of a 4-bit two's complement nibble (only the low 4 bits of `nibble` are read).
inline int int4_from_nibble(unsigned nibble) {
  const int v = static_cast<int>(nibble & 0xfu);
  return v >= 8 ? v - 16 : v;
}

// Packs two int4 values (each in -8..7) into one byte: `lo` is the even k, `hi` the odd k.
inline uint8_t pack_int4(int lo, int hi) {
  return static_cast<uint8_t>((static_cast<unsigned>(lo) & 0xfu) |
                              ((static_cast<unsigned>(hi) & 0xfu) << 4));
}

inline int unpack_int4_lo(uint8_t byte) { return int4_from_nibble(byte); }
inline int unpack_int4_hi(uint8_t byte) { return int4_from_nibble(static_cast<unsigned>(byte) >> 4); }

// Element k of a packed row.
inline int int4_get(const uint8_t* row, size_t k) {
  const uint8_t byte = row[k / 2];
  return (k & 1) ? unpack_int4_hi(byte) : unpack_int4_lo(byte);
}

// Sets element k of a packed row to v (-8..7), leaving the other nibble of its byte unchanged.
inline void int4_set(uint8_t* row, size_t k, int v) {
  uint8_t& byte = row[k / 2];
  const unsigned nib = static_cast<unsigned>(v) & 0xfu;
  byte = (k & 1) ? static_cast<uint8_t>((byte & 0x0fu) | (nib << 4))
                 : static_cast<uint8_t>((byte & 0xf0u) | nib);
}

// Dequantised element k of a row: int4 value x the bf16 scale of its 32-group.
inline double dequant(const uint8_t* row, const uint16_t* row_scales, size_t k) {
  return int4_get(row, k) * static_cast<double>(bf16_to_float(row_scales[k / kGroupSize]));
}

}  // namespace moejit::ref
