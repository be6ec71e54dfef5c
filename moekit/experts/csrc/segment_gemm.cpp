// Expert products over weight rows: segments of a few dozen rows, and the one-row forms of decode (kernels.h).
#include "kernels.h"

// Segments of up to a few hundred rows times their expert's matrix, where MKL's gemm spends much of its time
// packing weights it then uses for only a few rows: here each output element is a dot product of an input row and
// a weight row, both contiguous along K, computed in tiles of kTileRows input rows x kTileCols weight rows (12 AVX2
// accumulators, 7 loads per 12 FMAs). A work item is one segment's run of kColsPerItem weight rows, taken against
// kRowsPerPass input rows at a time: those stay in L2 while each tile's weight rows, read from memory once, stay in
// L1 for all of them, and where rows are shorter than a page the next tile's weight rows are prefetched meanwhile
// (four short streams at once, which the hardware prefetchers pick up too late). Measured here: 1.1-1.6x MKL's
// speed for 4-128 rows, 75-100% of the streaming bandwidth for 1-3, 60-80% for 4-8, on par with MKL around 256.
constexpr int kTileRows = 3, kTileCols = 4;  // dot_rows spells out kTileRows = 3
constexpr int64_t kColsPerItem = 96;  // weight rows per work item
constexpr int64_t kRowsPerPass = 48;  // input rows per pass: 48 rows of a 1-4K wide input stay in L2

// All m input rows (ldx apart) against NR weight rows.
template <int NR>
void dot_rows(const float* x, int64_t ldx, int64_t m, const float* w, int64_t k_len, float* y, int64_t ldy,
              const float* prefetch) {
  int64_t i = 0;
  if (prefetch) {  // the first tile prefetches
    i = std::min<int64_t>(m, kTileRows);
    if (i == 3) dot_tile<3, NR, true>(x, ldx, w, k_len, k_len, y, ldy, prefetch);
    if (i == 2) dot_tile<2, NR, true>(x, ldx, w, k_len, k_len, y, ldy, prefetch);
    if (i == 1) dot_tile<1, NR, true>(x, ldx, w, k_len, k_len, y, ldy, prefetch);
  }
  for (; i + kTileRows <= m; i += kTileRows)
    dot_tile<kTileRows, NR>(x + i * ldx, ldx, w, k_len, k_len, y + i * ldy, ldy);
  if (m - i == 2) dot_tile<2, NR>(x + i * ldx, ldx, w, k_len, k_len, y + i * ldy, ldy);
  if (m - i == 1) dot_tile<1, NR>(x + i * ldx, ldx, w, k_len, k_len, y + i * ldy, ldy);
}

// Weight rows [n0, n1) of one product against all its input rows.
void product_columns(const Product& p, int64_t n0, int64_t n1) {
  const int64_t k_len = p.k_len;
  if (p.m <= 3 && k_len < kLongRow) {  // up to three rows against short weight rows: one stream (kernels.h)
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t i = 0; i < p.m; ++i) p.y[i * p.ldy + n] = dot(p.w + n * k_len, p.x + i * p.ldx, k_len);
    return;
  }
  // A pass's input rows stay in L2 while the item's weight rows go by (from memory on the first pass only).
  for (int64_t r0 = 0; r0 < p.m; r0 += kRowsPerPass) {
    const int64_t m = std::min(kRowsPerPass, p.m - r0);
    const float* x = p.x + r0 * p.ldx;
    float* y = p.y + r0 * p.ldy;
    int64_t n = n0;
    for (; n + kTileCols <= n1; n += kTileCols) {
      // rows of a page or more: the hardware prefetchers follow them, and software prefetches only evict the
      // input rows from L1 (measured 1.1-1.2x at 1-3 rows without); shorter ones gain from them at 4 rows and more
      const bool prefetch = r0 == 0 && k_len < kLongRow && n + 2 * kTileCols <= n1;
      const float* next = prefetch ? p.w + (n + kTileCols) * k_len : nullptr;
      dot_rows<kTileCols>(x, p.ldx, m, p.w + n * k_len, k_len, y + n, p.ldy, next);
    }
    for (; n < n1; ++n) dot_rows<1>(x, p.ldx, m, p.w + n * k_len, k_len, y + n, p.ldy, nullptr);
  }
}

void run_products(const std::vector<Product>& products, int64_t threads) {
  std::vector<int64_t> first(products.size() + 1, 0);  // product i owns items [first[i], first[i + 1])
  for (size_t i = 0; i < products.size(); ++i)
    first[i + 1] = first[i] + (products[i].n_len + kColsPerItem - 1) / kColsPerItem;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t item = 0; item < first.back(); ++item) {
    const size_t i = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
    const int64_t n0 = (item - first[i]) * kColsPerItem;
    product_columns(products[i], n0, std::min(products[i].n_len, n0 + kColsPerItem));
  }
}

// Segments: rows [start, start + count) of x (sorted by expert) times expert e's matrix, into the same rows of y.
// w [E, N, K] contiguous; x [S, K] and y [S, N] contiguous.
void segment_gemm(at::Tensor w, at::Tensor x, at::Tensor experts, at::Tensor starts,
                  at::Tensor counts, at::Tensor y, int64_t threads) {
  run_products(segment_products(w, x, experts, starts, counts, y, false, "segment_gemm"), threads);
}

// One row per task: y[r] = w[ids[r]] @ x[r]. w [E, N, K] contiguous; x [R, K] with unit inner stride and any row
// stride (0: one row shared by all, as the k experts of one token share it); y [R, N] contiguous.
void gather_gemv(at::Tensor w, at::Tensor x, at::Tensor ids, at::Tensor y, int64_t threads) {
  check_fp32(w, "w"), check_fp32(x, "x"), check_fp32(y, "y");
  TORCH_CHECK(w.is_contiguous() && y.is_contiguous() && x.dim() == 2 && x.stride(1) == 1, "gather_gemv: layout");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == x.size(1) && ids.dim() == 1 && ids.size(0) == x.size(0), "gather_gemv: shapes");
  const int64_t n_len = w.size(1), k_len = w.size(2);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == n_len, "gather_gemv: output shape");
  TORCH_CHECK(ids.dtype() == at::kLong && ids.is_contiguous() && ids.device().is_cpu(), "gather_gemv: ids");
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t r = 0; r < ids.size(0); ++r) {
    TORCH_CHECK(ip[r] >= 0 && ip[r] < w.size(0), "gather_gemv: expert id out of range");
    tasks.push_back({w.data_ptr<float>() + ip[r] * n_len * k_len, n_len, x.data_ptr<float>() + r * x.stride(0), 0, 1,
                     y.data_ptr<float>() + r * n_len, 0});
  }
  run_tasks(tasks, k_len, threads);
}

// Several linear layers on the same input row in one pass: ys[i] = ws[i] @ x. ws[i] [N_i, K] and ys[i] [N_i]
// contiguous, x [K] contiguous.
void linear_gemv(std::vector<at::Tensor> ws, at::Tensor x, std::vector<at::Tensor> ys, int64_t threads) {
  check_fp32(x, "x");
  TORCH_CHECK(x.is_contiguous() && x.dim() == 1 && ws.size() == ys.size(), "linear_gemv: shapes");
  std::vector<Task> tasks;
  for (size_t i = 0; i < ws.size(); ++i) {
    check_fp32(ws[i], "w"), check_fp32(ys[i], "y");
    TORCH_CHECK(ws[i].is_contiguous() && ws[i].dim() == 2 && ws[i].size(1) == x.size(0), "linear_gemv: weight");
    TORCH_CHECK(ys[i].is_contiguous() && ys[i].numel() == ws[i].size(0), "linear_gemv: output");
    tasks.push_back({ws[i].data_ptr<float>(), ws[i].size(0), x.data_ptr<float>(), 0, 1, ys[i].data_ptr<float>(), 0});
  }
  run_tasks(tasks, x.size(0), threads);
}

