// Quantized matrices to fp32, as the formats' torch dequantization computes them (moekit/quant), bit for bit: one
// integer or table value times one scale per value. For products over many rows (prefill, training), which then run
// in fp32 on MKL: the torch version's unpacking and scale expansion cost about 5x the products they feed.
#include "quant_codes.h"

using namespace quant;

namespace {

#if defined(__AVX2__) && defined(__FMA__)
// 32 signed values (int8 lanes, element order) of one group of 4-bit codes: byte j holds elements 2j and 2j + 1
inline __m256i nibbles_in_order(const uint8_t* w) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
}

// y[0:32] = (values - offset) * scale, values 32 int8 lanes
inline void store_group(__m256i values, int32_t offset, float scale, float* y) {
  const __m256i off = _mm256_set1_epi32(offset);
  const __m256 s = _mm256_set1_ps(scale);
  alignas(32) int8_t v[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), values);
  for (int i = 0; i < 4; ++i) {
    const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + 8 * i)));
    _mm256_storeu_ps(y + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(w, off)), s));
  }
}
#endif

// row o of an integer or MXFP4 matrix
template <int64_t FMT>
void dequantize_row(const QuantMatrix& m, int64_t o, int64_t groups, float* y) {
  constexpr int64_t group_bytes = FMT == kInt8 ? kGroup : kGroup / 2;
  const uint8_t* w = m.codes + o * m.row_bytes;
  const uint8_t* scale_bytes = static_cast<const uint8_t*>(m.scales) + o * groups * (FMT == kMxfp4 ? 1 : 2);
  for (int64_t g = 0; g < groups; ++g, w += group_bytes, y += kGroup) {
    // MXFP4 values held doubled with their scale halved, as the products hold them: the same fp32 numbers
    const float scale = group_scale<FMT>(scale_bytes, g);
    const int32_t offset = FMT == kMxfp4 ? 0 : code_offset<FMT>(m, o, g, groups);
#if defined(__AVX2__) && defined(__FMA__)
    __m256i values;
    if constexpr (FMT == kInt8) {
      values = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), _mm256_set1_epi8(-128));
    } else if constexpr (FMT == kInt4) {
      values = nibbles_in_order(w);
    } else {
      const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2m1Doubled));
      values = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(table), nibbles_in_order(w));
    }
    store_group(values, offset, scale, y);
#else
    for (int64_t i = 0; i < kGroup; ++i) {
      int32_t v;
      if constexpr (FMT == kInt8) {
        v = static_cast<int32_t>(w[i]) - 128;
      } else {
        const uint8_t code = (w[i / 2] >> (4 * (i % 2))) & 0x0F;
        v = FMT == kInt4 ? code : kE2m1Doubled[code];
      }
      y[i] = static_cast<float>(v - offset) * scale;
    }
#endif
  }
}

}  // namespace

void QuantWeights::dequantize(const int64_t* ids, int64_t n, float* out, int64_t threads) const {
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(ids[r] >= 0 && ids[r] < experts, "quant dequantize: expert id");
  const uint8_t* cp = codes_.data_ptr<uint8_t>();
  const int64_t total = n * rows;
  if (format == kFp8) {
    const int64_t piece_rows = rows / pieces_, grid_rows = (piece_rows + block_rows_ - 1) / block_rows_;
    const int64_t grid_cols = (cols + block_cols_ - 1) / block_cols_;
    const float* sp = scales_.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < total; ++t) {
      const int64_t e = ids[t / rows], o = t % rows;
      const uint8_t* w = cp + (e * rows + o) * cols;
      const float* srow = sp + e * pieces_ * grid_rows * grid_cols +
                          ((o / piece_rows) * grid_rows + (o % piece_rows) / block_rows_) * grid_cols;
      float* y = out + t * cols;
      for (int64_t j = 0; j < grid_cols; ++j) {
        const int64_t c1 = std::min(cols, (j + 1) * block_cols_);
        int64_t c = j * block_cols_;
#if defined(__AVX2__) && defined(__FMA__)
        // (value x 2^-8) x (scale x 2^8): both factors exact, so the one rounding is that of value x scale
        const __m256 s = _mm256_set1_ps(256.f * srow[j]);
        for (; c + 16 <= c1; c += 16) {
          __m256 lo, hi;
          e4m3_to_float_x16(w + c, lo, hi);
          _mm256_storeu_ps(y + c, _mm256_mul_ps(lo, s));
          _mm256_storeu_ps(y + c + 8, _mm256_mul_ps(hi, s));
        }
#endif
        for (; c < c1; ++c) y[c] = e4m3_to_float(w[c]) * srow[j];
      }
    }
    return;
  }
  const int64_t groups = cols / kGroup, row_bytes = codes_.size(2);
  const auto scale_bytes = static_cast<int64_t>(scales_.element_size());
  const int32_t* zp = zero_points_.numel() ? zero_points_.data_ptr<int32_t>() : nullptr;
  const int64_t zp_words = zp ? zero_points_.size(1) * groups : 0;
  const auto run = [&](auto fmt) {
    constexpr int64_t F = decltype(fmt)::value;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < total; ++t) {
      const int64_t e = ids[t / rows];
      const QuantMatrix m{cp + e * rows * row_bytes, row_bytes,
                          static_cast<const uint8_t*>(scales_.data_ptr()) + e * rows * groups * scale_bytes,
                          zp ? zp + e * zp_words : nullptr};
      dequantize_row<F>(m, t % rows, groups, out + t * cols);
    }
  };
  if (format == kInt8) run(std::integral_constant<int64_t, kInt8>{});
  if (format == kInt4) run(std::integral_constant<int64_t, kInt4>{});
  if (format == kMxfp4) run(std::integral_constant<int64_t, kMxfp4>{});
}

// out [R, rows, cols] fp32 = the matrices ids[r] of w.
void quant_dequantize(const QuantWeights& w, at::Tensor ids, at::Tensor out, int64_t threads) {
  check_fp32(out, "out");
  TORCH_CHECK(ids.dtype() == at::kLong && ids.is_contiguous() && ids.dim() == 1, "quant_dequantize: ids");
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous() && out.size(0) == ids.numel() && out.size(1) == w.rows &&
                  out.size(2) == w.cols,
              "quant_dequantize: out must be contiguous [ids, rows, cols]");
  w.dequantize(ids.data_ptr<int64_t>(), ids.numel(), out.data_ptr<float>(), threads);
}
