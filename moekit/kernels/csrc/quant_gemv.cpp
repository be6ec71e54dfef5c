// One-row products straight from quantized weights (decode: a token's k experts, a linear layer's one row). The
// weights stay in the bytes the checkpoint ships: compressed-tensors pack-quantized INT8 / INT4 (symmetric or with
// packed zero points) with bf16 group scales, and gpt-oss's MXFP4 (E2M1 nibbles, UE8M0 scales); group 32 along the
// input. Each input row is quantized once to int8 per group of 32 (scale amax / 127, round half to even: what
// moekit/kernels/quantized.py's reference does), the products are integer dot products (AVX2 maddubs), and each
// group adds its sum times weight scale times activation scale. Weight rows are spread over the threads as runs of
// blocks (kernels.h), each row read once.
#include "quant_codes.h"

using namespace quant;

namespace {

// One input row quantized per group: q in element order, q_nib the same per group as its 16 even-indexed then its
// 16 odd-indexed values (the order a group's nibbles unpack in: byte j holds elements 2j and 2j + 1), the group's
// scale d and the sum of its q.
struct QuantRow {
  std::vector<int8_t> q, q_nib;
  std::vector<float> d, sum_f;  // sum_f: the sums as floats (exact: at most 32 x 127)
  std::vector<int32_t> sum;
};

void quantize_row(const float* x, int64_t n, QuantRow& r) {
  const int64_t groups = n / kGroup;
  r.q.resize(n), r.q_nib.resize(n), r.d.resize(groups), r.sum.resize(groups), r.sum_f.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * kGroup;
    float amax = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float d = amax / 127.f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kGroup; ++i) {
      const int8_t q = d > 0.f ? static_cast<int8_t>(std::nearbyint(xg[i] / d)) : 0;
      r.q[g * kGroup + i] = q;
      r.q_nib[g * kGroup + i / 2 + (i % 2) * 16] = q;
      sum += q;
    }
    r.d[g] = d, r.sum[g] = sum, r.sum_f[g] = static_cast<float>(sum);
  }
}

// The integer dot products of one group's 32 weight codes with its quantized activations (codes in the format's
// own terms: int8 values, int4 codes 0..15 before their offset, MXFP4 doubled E2M1 values): 8 partial sums (AVX2)
// whose total is the group's dot product.
#if defined(__AVX2__) && defined(__FMA__)
template <int64_t FMT>
inline __m256i group_dot(const uint8_t* w, const int8_t* q, const int8_t* q_nib) {
  __m256i prod;
  if constexpr (FMT == kInt8) {
    const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), _mm256_set1_epi8(-128));
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    prod = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(x, v));
  } else {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    const __m256i codes = _mm256_and_si256(both, m4);
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q_nib));
    if constexpr (FMT == kInt4) {
      prod = _mm256_maddubs_epi16(codes, x);
    } else {  // the doubled E2M1 values + 12, unsigned: the 12 comes off through the activation sums
      const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2m1Plus12)));
      prod = _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut, codes), x);
    }
  }
  return _mm256_madd_epi16(prod, _mm256_set1_epi16(1));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

template <int64_t FMT>
inline int32_t group_dot_scalar(const uint8_t* w, const int8_t* q, const int8_t* q_nib) {
  int32_t acc = 0;
  for (int64_t i = 0; i < kGroup; ++i) {
    if constexpr (FMT == kInt8) {
      acc += (static_cast<int32_t>(w[i]) - 128) * q[i];
    } else {
      const uint8_t code = i < 16 ? (w[i] & 0x0F) : (w[i - 16] >> 4);
      acc += (FMT == kInt4 ? code : kE2m1Doubled[code]) * q_nib[i];
    }
  }
  return acc;
}

template <int64_t FMT>
float row_product(const QuantMatrix& m, int64_t o, int64_t groups, const QuantRow& x) {
  const uint8_t* w = m.codes + o * m.row_bytes;
  constexpr int64_t group_bytes = FMT == kInt8 ? kGroup : kGroup / 2;
  const uint8_t* scale_bytes = static_cast<const uint8_t*>(m.scales) + o * groups * (FMT == kMxfp4 ? 1 : 2);
  const bool offsets = FMT == kInt4 || m.zero_points;
  float correction = 0.f;  // the codes' offsets times the activation sums, scaled
  int64_t g = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // four accumulators: one would make every group wait for the previous group's multiply-add (its latency)
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 corr = _mm256_setzero_ps();
  for (; g + 8 <= groups; g += 8) {  // eight groups' scales at once, each broadcast from its lane
    // the lines kPrefetchBytes ahead in this stream (the next rows follow this one): the streams' own prefetch
    // leaves the quantized rows at about half the machine's read rate
    for (int64_t line = 0; line < 8 * group_bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + g * group_bytes + line + kPrefetchBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(scale_bytes + g * (FMT == kMxfp4 ? 1 : 2) + kPrefetchBytes / 8),
                 _MM_HINT_T0);
    __m256 scale;
    if constexpr (FMT == kMxfp4) {  // 2^(s - 128) built from its bits (s = 0: the subnormal 2^-128)
      const __m256i s32 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scale_bytes + g)));
      const __m256i bits = _mm256_slli_epi32(_mm256_sub_epi32(s32, _mm256_set1_epi32(1)), 23);
      const __m256i zero = _mm256_cmpeq_epi32(s32, _mm256_setzero_si256());
      scale = _mm256_castsi256_ps(_mm256_blendv_epi8(bits, _mm256_set1_epi32(0x00200000), zero));
    } else {
      const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scale_bytes + 2 * g));
      scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
    const __m256 sd = _mm256_mul_ps(scale, _mm256_loadu_ps(x.d.data() + g));
    if ((FMT == kInt4 || FMT == kMxfp4) && !m.zero_points) {  // a constant offset: times the sums, per row
      corr = _mm256_fmadd_ps(sd, _mm256_loadu_ps(x.sum_f.data() + g), corr);
    } else if (offsets) {
      alignas(32) float off_sum[8];
      for (int j = 0; j < 8; ++j) off_sum[j] = static_cast<float>(code_offset<FMT>(m, o, g + j, groups) * x.sum[g + j]);
      corr = _mm256_fmadd_ps(sd, _mm256_load_ps(off_sum), corr);
    }
    for (int j = 0; j < 8; ++j) {
      const __m256i dot = group_dot<FMT>(w + (g + j) * group_bytes, x.q.data() + (g + j) * kGroup,
                                         x.q_nib.data() + (g + j) * kGroup);
      acc[j % 4] =
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_permutevar8x32_ps(sd, _mm256_set1_epi32(j)), acc[j % 4]);
    }
  }
  float total = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  correction = hsum(corr) * (FMT == kMxfp4 ? 12.f : FMT == kInt4 && !m.zero_points ? 8.f : 1.f);
#else
  float total = 0.f;
#endif
  for (; g < groups; ++g) {  // the last groups of a width that is not a multiple of 8 x 32 (Qwen3's 384)
    const float sd = group_scale<FMT>(scale_bytes, g) * x.d[g];
    if (offsets) correction += static_cast<float>(code_offset<FMT>(m, o, g, groups) * x.sum[g]) * sd;
    const uint8_t* wg = w + g * group_bytes;
    const int8_t *qg = x.q.data() + g * kGroup, *nib = x.q_nib.data() + g * kGroup;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256i dot = group_dot<FMT>(wg, qg, nib);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(dot), _mm256_extracti128_si256(dot, 1));
    s = _mm_hadd_epi32(s, s);
    const int32_t plus12 = FMT == kMxfp4 ? 12 * x.sum[g] : 0;  // the table's +12 (group_dot) comes off here
    total += static_cast<float>(_mm_cvtsi128_si32(_mm_hadd_epi32(s, s)) - plus12) * sd;
#else
    total += static_cast<float>(group_dot_scalar<FMT>(wg, qg, nib)) * sd;
#endif
  }
  return total - correction;
}

}  // namespace

namespace {

// dot(row of e4m3 weights, x) over [c0, c1), times 2^-8 (the caller's scale carries the 2^8)
inline float fp8_span(const uint8_t* w, const float* x, int64_t c0, int64_t c1) {
  int64_t c = c0;
  float acc = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; c + 16 <= c1; c += 16) {
    if (c % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + c + kPrefetchBytes), _MM_HINT_T0);
    __m256 lo, hi;
    e4m3_to_float_x16(w + c, lo, hi);
    a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + c), a0);
    a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + c + 8), a1);
  }
  acc = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; c < c1; ++c) acc += e4m3_to_float(w[c]) * 0.00390625f * x[c];
  return acc;
}

// FP8 row r of expert matrix we [O, I] (e4m3 bytes) with its block scales se: dot with fp32 x.
inline float fp8_row(const uint8_t* we, const float* se, int64_t o, const float* x, int64_t k_len, int64_t piece_rows,
                     int64_t grid_rows, int64_t grid_cols, int64_t block_rows, int64_t block_cols) {
  const float* srow = se + ((o / piece_rows) * grid_rows + (o % piece_rows) / block_rows) * grid_cols;
  float acc = 0.f;
  for (int64_t j = 0; j < grid_cols; ++j)
    acc += 256.f * srow[j] * fp8_span(we + o * k_len, x, j * block_cols, std::min(k_len, (j + 1) * block_cols));
  return acc;
}

}  // namespace

QuantWeights::QuantWeights(int64_t format, at::Tensor codes, at::Tensor scales, at::Tensor zero_points,
                           int64_t block_rows, int64_t block_cols, int64_t pieces, int64_t cols)
    : format(format), experts(codes.size(0)), rows(codes.size(1)), cols(cols), codes_(codes), scales_(scales),
      zero_points_(zero_points), block_rows_(block_rows), block_cols_(block_cols), pieces_(pieces) {
  TORCH_CHECK(format >= kInt8 && format <= kFp8, "QuantWeights: format");
  TORCH_CHECK(codes.device().is_cpu() && codes.dtype() == at::kByte && codes.dim() == 3 && codes.is_contiguous(),
              "QuantWeights: codes must be contiguous uint8 [E, O, bytes]");
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 3 && scales.size(0) == experts, "QuantWeights: scales");
  if (format == kFp8) {
    TORCH_CHECK(codes.size(2) == cols && block_rows > 0 && block_cols > 0 && pieces > 0 && rows % pieces == 0,
                "QuantWeights: fp8 blocks");
    const int64_t grid_rows = (rows / pieces + block_rows - 1) / block_rows;
    TORCH_CHECK(scales.dtype() == at::kFloat && scales.size(1) == pieces * grid_rows &&
                    scales.size(2) == (cols + block_cols - 1) / block_cols,
                "QuantWeights: fp8 scale grid");
    return;
  }
  const int64_t groups = cols / kGroup;
  TORCH_CHECK(cols % kGroup == 0 && cols > 0, "QuantWeights: the input width must be a multiple of 32");
  TORCH_CHECK(codes.size(2) * (format == kInt8 ? 1 : 2) >= cols, "QuantWeights: codes too short for the input");
  TORCH_CHECK(scales.size(1) == rows && scales.size(2) == groups &&
                  scales.dtype() == (format == kMxfp4 ? at::kByte : at::kBFloat16),
              "QuantWeights: scales shape or dtype");
  if (zero_points.numel()) {
    const int64_t per_word = format == kInt8 ? 4 : 8;
    TORCH_CHECK(format != kMxfp4 && zero_points.dtype() == at::kInt && zero_points.is_contiguous() &&
                    zero_points.dim() == 3 && zero_points.size(0) == experts &&
                    zero_points.size(1) == (rows + per_word - 1) / per_word && zero_points.size(2) == groups,
                "QuantWeights: zero points");
  }
}

void QuantWeights::products(const int64_t* ids, const float* const* xs, float* const* ys, int64_t n,
                            int64_t threads) const {
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(ids[r] >= 0 && ids[r] < experts, "quant products: expert id");
  const auto task_rows = [&](size_t) { return rows; };
  const std::vector<int64_t> first = first_blocks(n, task_rows);
  const int64_t blocks = first.back();
  const uint8_t* cp = codes_.data_ptr<uint8_t>();
  if (format == kFp8) {
    const int64_t piece_rows = rows / pieces_, grid_rows = (piece_rows + block_rows_ - 1) / block_rows_;
    const int64_t grid_cols = (cols + block_cols_ - 1) / block_cols_;
    const float* sp = scales_.data_ptr<float>();
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int64_t part = 0; part < threads; ++part)
      for_each_share(first, blocks * part / threads, blocks * (part + 1) / threads, task_rows,
                     [&](size_t r, int64_t o0, int64_t o1) {
                       const uint8_t* we = cp + ids[r] * rows * cols;
                       const float* se = sp + ids[r] * pieces_ * grid_rows * grid_cols;
                       quarter_rows(o0, o1, [&](int64_t o) {
                         ys[r][o] = fp8_row(we, se, o, xs[r], cols, piece_rows, grid_rows, grid_cols, block_rows_,
                                            block_cols_);
                       });
                     });
    return;
  }
  // each distinct input row quantized once
  std::vector<QuantRow> xq;
  std::vector<int64_t> row_of(n);
  for (int64_t r = 0; r < n; ++r) {
    if (r > 0 && xs[r] == xs[r - 1]) {
      row_of[r] = row_of[r - 1];
      continue;
    }
    row_of[r] = static_cast<int64_t>(xq.size());
    xq.emplace_back();
    quantize_row(xs[r], cols, xq.back());
  }
  const int64_t groups = cols / kGroup, row_bytes = codes_.size(2);
  const auto scale_bytes = static_cast<int64_t>(scales_.element_size());
  const int32_t* zp = zero_points_.numel() ? zero_points_.data_ptr<int32_t>() : nullptr;
  const int64_t zp_words = zp ? zero_points_.size(1) * groups : 0;
  std::vector<QuantMatrix> mats(n);
  for (int64_t r = 0; r < n; ++r)
    mats[r] = {cp + ids[r] * rows * row_bytes, row_bytes,
               static_cast<const uint8_t*>(scales_.data_ptr()) + ids[r] * rows * groups * scale_bytes,
               zp ? zp + ids[r] * zp_words : nullptr};
  const auto run = [&](auto fmt) {
    constexpr int64_t F = decltype(fmt)::value;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int64_t part = 0; part < threads; ++part)
      for_each_share(first, blocks * part / threads, blocks * (part + 1) / threads, task_rows,
                     [&](size_t r, int64_t o0, int64_t o1) {
                       quarter_rows(o0, o1, [&](int64_t o) {
                         ys[r][o] = row_product<F>(mats[r], o, groups, xq[row_of[r]]);
                       });
                     });
  };
  if (format == kInt8) run(std::integral_constant<int64_t, kInt8>{});
  if (format == kInt4) run(std::integral_constant<int64_t, kInt4>{});
  if (format == kMxfp4) run(std::integral_constant<int64_t, kMxfp4>{});
}

// y[r] = dequantized(w[ids[r]]) @ x[r] for r < R; x [R or 1, I] fp32 (one row: the same for all), y [R, O] fp32.
void quant_gemv(const QuantWeights& w, at::Tensor ids, at::Tensor x, at::Tensor y, int64_t threads) {
  check_fp32(x, "x"), check_fp32(y, "y");
  const int64_t rows = ids.numel();
  TORCH_CHECK(ids.dtype() == at::kLong && ids.is_contiguous(), "quant_gemv: ids");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == w.cols && (x.size(0) == rows || x.size(0) == 1),
              "quant_gemv: x");
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.size(0) == rows && y.size(1) == w.rows, "quant_gemv: y");
  std::vector<const float*> xs(rows);
  std::vector<float*> ys(rows);
  for (int64_t r = 0; r < rows; ++r)
    xs[r] = x.data_ptr<float>() + (x.size(0) == 1 ? 0 : r * w.cols), ys[r] = y.data_ptr<float>() + r * w.rows;
  w.products(ids.data_ptr<int64_t>(), xs.data(), ys.data(), rows, threads);
}
