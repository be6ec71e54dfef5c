// Expert weight gradients, dw[e] = dy_e^T x_e over each expert's segment of rows: an outer-product kernel whose
// inner dimension is the segment's few dozen rows. Tiles of 3 dw rows x 32 columns (12 AVX2 accumulators, 7 loads
// per 12 FMAs) over panels of x and dy packed contiguous first: read in place, the rows of x and dy lie a page (or
// a multiple of 512 bytes) apart, so a tile's loads all fall into the same few L1 sets and evict one another
// (measured: less than half the speed). Each dw element is written once, with streaming stores where the rows are
// 32-byte aligned (no read of the destination line first), untouched experts' rows included (zeros). Measured here
// on Qwen3- and Mixtral-shaped experts: 2-6x MKL's speed at 2-8 rows (about 20 GB/s of writes, this machine's
// streaming-store rate for nonzero data; zeros went out at 35-40), 1.0-2x at 16-192.
#include "kernels.h"

namespace {

constexpr int64_t kPanel = 32;        // dw columns (x columns) per panel: four vectors
constexpr int64_t kRowsPerItem = 96;  // dw rows per work item (its dy columns are packed once for them)
constexpr int64_t kFewRows = 8;       // segments up to this many rows are bound by writing dw (grad_rows)

// dw[r, 0:32] = sum_i dy[i, r] * x[i, 0:32] for r < MR; dy packed [m][ldd], x packed [m][32].
template <int MR, bool kStream>
void outer_tile(const float* dy, int64_t ldd, const float* x, int64_t m, float* dw, int64_t ldw) {
#if defined(__AVX2__) && defined(__FMA__)
  // every small loop unrolled by name: GCC 12 otherwise keeps acc on the stack too, stored back at every step of
  // the loop over i (half the speed)
  __m256 acc[MR][4];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    __m256 xv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) xv[v] = _mm256_loadu_ps(x + i * kPanel + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 c = _mm256_broadcast_ss(dy + i * ldd + r);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_fmadd_ps(c, xv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      if constexpr (kStream)
        _mm256_stream_ps(dw + r * ldw + 8 * v, acc[r][v]);
      else
        _mm256_storeu_ps(dw + r * ldw + 8 * v, acc[r][v]);
    }
#else
  for (int r = 0; r < MR; ++r)
    for (int64_t c = 0; c < kPanel; ++c) {
      float v = 0.f;
      for (int64_t i = 0; i < m; ++i) v += dy[i * ldd + r] * x[i * kPanel + c];
      dw[r * ldw + c] = v;
    }
#endif
}

// dw rows [n0, n1) of one segment (m rows of dy [.., n_len] and x [.., k_len]): dy's columns for them packed
// [m][n1 - n0] into dyp, x's full panels packed [m][32] each into xp. Segments of up to kFewRows rows are bound by
// writing dw: all their panels are packed at once ([panels][m][32], a few KB) and dw is written one row at a time,
// start to end, a single stream (three rows at once, 4 KB apart, wrote 1.3-1.9x slower here, likely one DRAM bank
// for all three). Longer ones are compute-bound: 3-row tiles, one panel at a time, in L1 for all the rows.
template <bool kStream>
void grad_rows(const float* dy, int64_t n_len, const float* x, int64_t k_len, int64_t m, int64_t n0, int64_t n1,
               float* dw, float* dyp, float* xp) {
  const int64_t rows = n1 - n0, k_full = k_len / kPanel * kPanel;
  for (int64_t i = 0; i < m; ++i) std::copy(dy + i * n_len + n0, dy + i * n_len + n1, dyp + i * rows);
  const auto dw_at = [&](int64_t r, int64_t k) { return dw + (n0 + r) * k_len + k; };
  if (m <= kFewRows) {
    for (int64_t k = 0; k < k_full; k += kPanel)
      for (int64_t i = 0; i < m; ++i) std::copy_n(x + i * k_len + k, kPanel, xp + k * m + i * kPanel);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < k_full; k += kPanel)
        outer_tile<1, kStream>(dyp + r, rows, xp + k * m, m, dw_at(r, k), k_len);
  } else {
    for (int64_t k = 0; k < k_full; k += kPanel) {
      for (int64_t i = 0; i < m; ++i) std::copy_n(x + i * k_len + k, kPanel, xp + i * kPanel);
      int64_t r = 0;
      for (; r + 3 <= rows; r += 3) outer_tile<3, kStream>(dyp + r, rows, xp, m, dw_at(r, k), k_len);
      for (; r < rows; ++r) outer_tile<1, kStream>(dyp + r, rows, xp, m, dw_at(r, k), k_len);
    }
  }
  for (int64_t r = 0; r < rows; ++r)  // the columns past the last full panel
    for (int64_t k = k_full; k < k_len; ++k) {
      float v = 0.f;
      for (int64_t i = 0; i < m; ++i) v += dyp[i * rows + r] * x[i * k_len + k];
      dw[(n0 + r) * k_len + k] = v;
    }
}

}  // namespace

// dw[e] = dy_e^T x_e for each (expert e, start, count) segment, count <= kTiledRows (dw[e] = 0 for count 0).
// w-shaped dw [E, N, K], x [S, K] and dy [S, N] contiguous.
void segment_grad_weight(at::Tensor x, at::Tensor dy, at::Tensor experts, at::Tensor starts, at::Tensor counts,
                         at::Tensor dw, int64_t threads) {
  check_fp32(x, "x"), check_fp32(dy, "dy"), check_fp32(dw, "dw");
  TORCH_CHECK(x.is_contiguous() && dy.is_contiguous() && dw.is_contiguous(), "segment_grad_weight: contiguous only");
  TORCH_CHECK(dw.dim() == 3 && x.dim() == 2 && dy.dim() == 2 && dw.size(2) == x.size(1) && dw.size(1) == dy.size(1) &&
                  x.size(0) == dy.size(0),
              "segment_grad_weight: shapes");
  const int64_t n_len = dw.size(1), k_len = dw.size(2), segments = experts.size(0);
  check_segments(experts, starts, counts, dw.size(0), x.size(0), kTiledRows, "segment_grad_weight");
  const int64_t* ep = experts.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const float* xd = x.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  int64_t max_count = 0;
  for (int64_t s = 0; s < segments; ++s) max_count = std::max(max_count, cp[s]);

  const bool stream = k_len % 8 == 0 && reinterpret_cast<uintptr_t>(dwp) % 32 == 0;
  const int64_t per_segment = (n_len + kRowsPerItem - 1) / kRowsPerItem;
#pragma omp parallel num_threads(threads)
  {
    const int64_t most = std::max<int64_t>(max_count, 1);
    std::vector<float> dyp(most * kRowsPerItem), xp(std::max(most * kPanel, std::min(most, kFewRows) * k_len));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < segments * per_segment; ++item) {
      const int64_t s = item / per_segment, n0 = item % per_segment * kRowsPerItem;
      const int64_t n1 = std::min(n_len, n0 + kRowsPerItem);
      const float* dy_s = dy.data_ptr<float>() + sp[s] * n_len;
      float* dw_e = dwp + ep[s] * n_len * k_len;
      (stream ? grad_rows<true> : grad_rows<false>)(dy_s, n_len, xd + sp[s] * k_len, k_len, cp[s], n0, n1, dw_e,
                                                    dyp.data(), xp.data());
    }
#if defined(__AVX2__) && defined(__FMA__)
    _mm_sfence();  // this thread's streamed rows are visible before the region ends
#endif
  }
}
