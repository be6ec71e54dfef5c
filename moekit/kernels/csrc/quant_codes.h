// What the kernels that read quantized weights share (quant_gemv.cpp, quant_dequantize.cpp): the formats' codes,
// their scales and offsets, and the conversions of their values to fp32.
#pragma once
#include "kernels.h"

#include <cstring>

namespace quant {

constexpr int64_t kGroup = 32;
enum Format : int64_t { kInt8 = 0, kInt4 = 1, kMxfp4 = 2, kFp8 = 3 };
// How far ahead of its reads a row product prefetches its stream: measured on a 144 MiB int4 matrix (2 threads),
// 1 KiB 26 GB/s, 2 KiB 30, 4 KiB 23, of the machine's 33.
constexpr int64_t kPrefetchBytes = 2048;

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// 2^(s - 128): an MXFP4 scale byte for values held doubled (E2M1 x 2 are the integers below)
struct Ue8m0Half {
  float v[256];
  Ue8m0Half() {
    for (int s = 0; s < 256; ++s) v[s] = std::ldexp(1.f, s - 128);
  }
};
inline const Ue8m0Half kUe8m0;
constexpr int8_t kE2m1Doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
constexpr uint8_t kE2m1Plus12[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

// A quantized matrix [O, I] (one expert's, or a linear layer's): codes row_bytes apart, scales [O, G] (bf16 for
// the integer formats, UE8M0 bytes for MXFP4), zero points (asymmetric integers: packed along O, [ceil(O * bits /
// 32), G] int32 words) or null.
struct QuantMatrix {
  const uint8_t* codes;
  int64_t row_bytes;
  const void* scales;
  const int32_t* zero_points;
};

// The offset of group g's codes in row o: int4's +8 and, asymmetric, the group's zero point (packed along O).
template <int64_t FMT>
inline int32_t code_offset(const QuantMatrix& m, int64_t o, int64_t g, int64_t groups) {
  constexpr int bits = FMT == kInt8 ? 8 : 4;
  int32_t offset = FMT == kInt4 ? 8 : 0;  // the int8 values are already signed
  if (m.zero_points) {
    constexpr int per_word = 32 / bits;
    const uint32_t word = static_cast<uint32_t>(m.zero_points[(o / per_word) * groups + g]);
    offset += static_cast<int32_t>((word >> (bits * (o % per_word))) & ((1u << bits) - 1)) - (1 << (bits - 1));
  }
  return offset;
}

template <int64_t FMT>
inline float group_scale(const uint8_t* scale_bytes, int64_t g) {
  if constexpr (FMT == kMxfp4) return kUe8m0.v[scale_bytes[g]];
  return bf16_to_float(reinterpret_cast<const uint16_t*>(scale_bytes)[g]);
}

// 16 e4m3 bytes as fp32 times 2^-8: their bits moved into fp16 (sign to bit 15, exponent and mantissa to bits 13..7)
// read as fp16 give the value times 2^(7 - 15), subnormals included; the 2^8 is folded into the block scale.
#if defined(__AVX2__) && defined(__FMA__)
inline void e4m3_to_float_x16(const uint8_t* w, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), 7));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
#endif

inline float e4m3_to_float(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 7;
  const float mag = e ? std::ldexp(1.f + m / 8.f, e - 7) : std::ldexp(m / 8.f, -6);
  return (b & 0x80) ? -mag : mag;
}

}  // namespace quant
