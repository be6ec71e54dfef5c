// Expert products over weight rows: segments of a few dozen rows, and the one-row forms of decode (kernels.h).
#include "kernels.h"

// Segments of up to a few hundred rows times their expert's matrix, where MKL's gemm spends much of its time
// packing weights it then uses for only a few rows: here each output element is a dot product of an input row and
// a weight row, both contiguous along K, computed in tiles of kTileRows input rows x kTileCols weight rows (12 AVX2
// accumulators, 7 loads per 12 FMAs). A work item is one segment's run of kColsPerItem weight rows.
// Up to kStreamedRows input rows the item is read as four sequential streams, its quarters side by side, a tile
// taking the next row of each: the hardware prefetchers follow four long streams well, more lines in flight than one
// stream (so past a large sum's bandwidth), where four fresh rows per tile each began a stream of their own and came
// in late (measured against that: 1.35-1.7x for 1.5 KB rows at 4-8 input rows, 1.05-1.4x for 4-14 KB rows at 2-8,
// the same at 1; against short rows read one after another, one stream: 1.2-1.45x at 1-3 rows).
// More input rows are taken kRowsPerPass at a time: those stay in L2 while each tile's weight rows stay in L1 for
// all of them. Then the tiles' arithmetic hides the loads no more: in L2 a 32-row segment ran at 155 GFLOP/s, from
// memory at 95. So while a tile's first input rows go by, they prefetch the next tile's weight rows, a share each,
// spread over up to eight tiles so the lines come in at about the rate they are used (1.1-1.4x for 6-64 rows);
// 1.1-1.6x MKL's speed before that; MKL 1.0-1.2x faster at 256-512 rows.
// Rows over two pages are taken in chunks of a page so a tile's four rows fit L1.
constexpr int kTileRows = 3, kTileCols = 4;  // dot_rows spells out kTileRows = 3
constexpr int64_t kColsPerItem = 96;  // weight rows per work item
constexpr int64_t kStreamedRows = 8;  // up to this many input rows: four streams (measured: 0.94-1.0x at 12)
constexpr int64_t kRowsPerPass = 48;  // input rows per pass: 48 rows of a 1-4K wide input stay in L2
constexpr int64_t kLongRow = 1024;  // floats: a 4 KB page
constexpr int64_t kChunkedRows = 2 * kLongRow;  // rows longer than this go in chunks of at most kLongRow

// The K chunk length of k_len-long rows: all of it, or for rows over two pages about a page (a multiple of 8).
inline int64_t chunk_len(int64_t k_len) {
  const int64_t chunks = k_len > kChunkedRows ? (k_len + kLongRow - 1) / kLongRow : 1;
  return (k_len / chunks + 7) / 8 * 8;
}

// The weight rows a tile loop reads next: kTileCols rows of `len` floats, `ld` apart (none: w null).
struct NextRows {
  const float* w;
  int64_t len, ld;
};

// The first tiles of dot_rows, each also prefetching its share of `next`: PF streams, one 64-byte line per stream
// every kEvery floats of K (kEvery 32: half a row per tile, spread over twice as many tiles).
template <int PF, int NR, int kEvery = 16>
int64_t prefetching_tiles(const float* x, int64_t ldx, int64_t m, const float* w, int64_t ldw, int64_t k_len,
                          float* y, int64_t ldy, NextRows next, bool add, int64_t ldc) {
  const int64_t piece = next.len * 16 / kEvery, pieces = kEvery / 16;  // per stream and tile; per row
  int64_t i = 0;
  for (int64_t q = 0; q < NR * pieces && i < m; q += PF, i += kTileRows) {
    const float* p = next.w + (q / pieces) * next.ld + (q % pieces) * piece;
    const float* xi = x + i * ldx;
    float* yi = y + i * ldy;
    if (m - i >= 3) dot_tile<3, NR, PF, kEvery>(xi, ldx, w, ldw, k_len, yi, ldy, p, next.ld, add, ldc);
    else if (m - i == 2) dot_tile<2, NR, PF, kEvery>(xi, ldx, w, ldw, k_len, yi, ldy, p, next.ld, add, ldc);
    else dot_tile<1, NR, PF, kEvery>(xi, ldx, w, ldw, k_len, yi, ldy, p, next.ld, add, ldc);
  }
  return std::min(i, m);
}

// All m input rows (ldx apart) against NR weight rows (ldw apart), into y's columns ldc apart; the first tiles
// prefetch next.w (when set), spread over as many tiles as there are, up to eight, so its lines come in at about
// the rate they will be used.
template <int NR>
void dot_rows(const float* x, int64_t ldx, int64_t m, const float* w, int64_t ldw, int64_t k_len, float* y,
              int64_t ldy, NextRows next, bool add, int64_t ldc = 1) {
  int64_t i = 0;
  if constexpr (NR == 4) {
    if (next.w) {
      const int64_t tiles = (m + kTileRows - 1) / kTileRows;
      if (tiles >= 8) i = prefetching_tiles<1, NR, 32>(x, ldx, m, w, ldw, k_len, y, ldy, next, add, ldc);
      else if (tiles >= 4) i = prefetching_tiles<1, NR>(x, ldx, m, w, ldw, k_len, y, ldy, next, add, ldc);
      else i = prefetching_tiles<2, NR>(x, ldx, m, w, ldw, k_len, y, ldy, next, add, ldc);
    }
  }
  for (; i + kTileRows <= m; i += kTileRows)
    dot_tile<kTileRows, NR>(x + i * ldx, ldx, w, ldw, k_len, y + i * ldy, ldy, nullptr, 0, add, ldc);
  if (m - i == 2) dot_tile<2, NR>(x + i * ldx, ldx, w, ldw, k_len, y + i * ldy, ldy, nullptr, 0, add, ldc);
  if (m - i == 1) dot_tile<1, NR>(x + i * ldx, ldx, w, ldw, k_len, y + i * ldy, ldy, nullptr, 0, add, ldc);
}

// Weight rows [n0, n1) of a product of at most kStreamedRows input rows: four streams of q rows each, a tile taking
// row s of every stream (weight rows n0 + s + j * q, output columns the same); the last (n1 - n0) % 4 rows alone.
void streamed_columns(const Product& p, int64_t n0, int64_t n1) {
  const int64_t k_len = p.k_len, kc = chunk_len(k_len), q = (n1 - n0) / kTileCols;
  for (int64_t s = 0; s < q; ++s)
    for (int64_t k0 = 0; k0 < k_len; k0 += kc)
      dot_rows<kTileCols>(p.x + k0, p.ldx, p.m, p.w + (n0 + s) * k_len + k0, q * k_len, std::min(kc, k_len - k0),
                          p.y + n0 + s, p.ldy, NextRows{nullptr, 0, 0}, k0 > 0, q);
  for (int64_t n = n0 + kTileCols * q; n < n1; ++n)
    dot_rows<1>(p.x, p.ldx, p.m, p.w + n * k_len, k_len, k_len, p.y + n, p.ldy, NextRows{nullptr, 0, 0}, false);
}

// Weight rows [n0, n1) of one product against all its input rows.
void product_columns(const Product& p, int64_t n0, int64_t n1) {
  if (p.m <= kStreamedRows) return streamed_columns(p, n0, n1);
  const int64_t k_len = p.k_len, kc = chunk_len(k_len);
  // A pass's input rows stay in L2 while the item's weight rows go by.
  for (int64_t r0 = 0; r0 < p.m; r0 += kRowsPerPass) {
    const int64_t m = std::min(kRowsPerPass, p.m - r0);
    const float* x = p.x + r0 * p.ldx;
    float* y = p.y + r0 * p.ldy;
    int64_t n = n0;
    for (; n + kTileCols <= n1; n += kTileCols) {
      const float* w = p.w + n * k_len;
      for (int64_t k0 = 0; k0 < k_len; k0 += kc) {
        const int64_t len = std::min(kc, k_len - k0);
        NextRows next{nullptr, 0, k_len};  // the tile's next chunk, or the next tile's first one
        if (k0 + kc < k_len) next = {w + k0 + kc, std::min(kc, k_len - k0 - kc), k_len};
        else if (n + 2 * kTileCols <= n1) next = {w + kTileCols * k_len, std::min(kc, k_len), k_len};
        dot_rows<kTileCols>(x + k0, p.ldx, m, w + k0, k_len, len, y + n, p.ldy, next, k0 > 0);
      }
    }
    for (; n < n1; ++n)
      dot_rows<1>(x, p.ldx, m, p.w + n * k_len, k_len, k_len, y + n, p.ldy, NextRows{nullptr, 0, 0}, false);
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

