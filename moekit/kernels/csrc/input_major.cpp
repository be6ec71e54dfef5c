// Products with input-major weights, y = x @ w for w [K, N]: GPT-OSS's and Llama 4's experts in the forward, and
// every output-major expert's input gradient (dx = dy @ w). Each output row is a sum of weight rows scaled by the
// input row's entries, so the weights are read row by row in place, each once for all the rows of its segment.
#include "kernels.h"

namespace {

// y[i, :] += sum_{j < NR} x[i, j * ldxc] * w[j, :] for rows i < MR: NR weight rows (ldw apart) read once for all
// MR rows.
template <int MR, int NR>
void axpy_tile(const float* x, int64_t ldx, int64_t ldxc, const float* w, int64_t ldw, int64_t n_len, float* y,
               int64_t ldy) {
  int64_t n = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 c[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i][j] = _mm256_set1_ps(x[i * ldx + j * ldxc]);
  for (; n + 8 <= n_len; n += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + n);
    for (int i = 0; i < MR; ++i) {
      __m256 acc = _mm256_loadu_ps(y + i * ldy + n);
      for (int j = 0; j < NR; ++j) acc = _mm256_fmadd_ps(c[i][j], wv[j], acc);
      _mm256_storeu_ps(y + i * ldy + n, acc);
    }
  }
#endif
  for (; n < n_len; ++n)
    for (int i = 0; i < MR; ++i) {
      float acc = y[i * ldy + n];
      for (int j = 0; j < NR; ++j) acc += x[i * ldx + j * ldxc] * w[j * ldw + n];
      y[i * ldy + n] = acc;
    }
}

// dest[i, :] += sum_{r in [r0, r1)} x[i, r] * w[r, :] over all the product's rows i. The rows go as four sequential
// streams, the range's quarters side by side, four weight rows at a time (row s of each), read from memory once,
// in stretches that stay in L1 with their outputs while the input rows go by two at a time. Four long streams are
// what the hardware prefetchers follow best: measured against four neighbouring rows at a time, each group
// prefetching the next, 1.0-1.2x for rows of 4-14 KB and 1.3-1.7x for 1.5 KB rows at 1-16 input rows.
// kStretch floats of four weight rows and 16 output rows fill most of L1; at 17-32 rows the outputs spill to L2,
// yet half the stretch for them ran 0.67-1.0x.
constexpr int64_t kStretch = 256;

void accumulate(const Product& p, int64_t r0, int64_t r1, float* dest, int64_t ldd) {
  const int64_t n_len = p.n_len, q = (r1 - r0) / 4, ldw = q * n_len;  // q rows per stream
  for (int64_t r = r0; r < r0 + q; ++r)
    for (int64_t n0 = 0; n0 < n_len; n0 += kStretch) {
      const int64_t len = std::min(kStretch, n_len - n0);
      const float* w = p.w + r * n_len + n0;
      const float* x = p.x + r;
      float* y = dest + n0;
      int64_t i = 0;
      for (; i + 2 <= p.m; i += 2) axpy_tile<2, 4>(x + i * p.ldx, p.ldx, q, w, ldw, len, y + i * ldd, ldd);
      if (i < p.m) axpy_tile<1, 4>(x + i * p.ldx, p.ldx, q, w, ldw, len, y + i * ldd, ldd);
    }
  for (int64_t r = r0 + 4 * q; r < r1; ++r)
    for (int64_t i = 0; i < p.m; ++i) axpy(p.x[i * p.ldx + r], p.w + r * n_len, dest + i * ldd, n_len);
}

void zero_rows(float* y, int64_t ld, int64_t m, int64_t n_len) {
  for (int64_t i = 0; i < m; ++i) std::fill(y + i * ld, y + i * ld + n_len, 0.f);
}

}  // namespace

void run_input_major(const std::vector<Product>& products, int64_t threads) {
  // Blocks of kRowsPerBlock weight rows; each thread takes one contiguous run of about equal cost (bytes read, or
  // FMAs where the segment has more rows than memory-bound products do), so it streams long stretches of memory.
  const size_t n_products = products.size();
  const auto rows = [&](size_t i) { return products[i].k_len; };
  const std::vector<int64_t> first = first_blocks(n_products, rows);
  const int64_t blocks = first.back();
  for (const Product& p : products)
    if (p.k_len == 0) zero_rows(p.y, p.ldy, p.m, p.n_len);
  if (blocks == 0) return;
  threads = std::max<int64_t>(1, std::min(threads, blocks));
  std::vector<double> cost(blocks + 1, 0.);  // cumulative
  for (size_t i = 0; i < n_products; ++i)
    for (int64_t b = first[i]; b < first[i + 1]; ++b)
      cost[b + 1] = cost[b] + static_cast<double>(products[i].n_len) * std::max<int64_t>(products[i].m, 8);
  std::vector<int64_t> split(threads + 1, blocks);  // thread t runs blocks [split[t], split[t + 1])
  for (int64_t t = 0; t < threads; ++t)
    split[t] = std::lower_bound(cost.begin(), cost.end() - 1, cost.back() * t / threads) - cost.begin();

  // A product whose blocks all lie in one run is written in place; one that two runs share is summed by each into
  // its own buffer, and the buffers are added in run order afterwards (the result depends on the thread count only).
  std::vector<std::vector<std::pair<size_t, std::vector<float>>>> shared(threads);
  auto run_range = [&](int64_t t) {
    for_each_share(first, split[t], split[t + 1], rows, [&](size_t p, int64_t r0, int64_t r1) {
      const Product& pr = products[p];
      float* dest = pr.y;
      int64_t ldd = pr.ldy;
      if (r0 == 0 && r1 == pr.k_len) {  // all of the product in this run
        zero_rows(dest, ldd, pr.m, pr.n_len);
      } else {
        shared[t].emplace_back(p, std::vector<float>(pr.m * pr.n_len, 0.f));
        dest = shared[t].back().second.data(), ldd = pr.n_len;
      }
      accumulate(pr, r0, r1, dest, ldd);
    });
  };
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int64_t tid = 0, team = 1;
#endif
    for (int64_t t = tid; t < threads; t += team) run_range(t);
  }
  std::vector<bool> started(n_products, false);
  for (auto& parts : shared)
    for (auto& [p, acc] : parts) {
      const Product& pr = products[p];
      if (!started[p]) zero_rows(pr.y, pr.ldy, pr.m, pr.n_len), started[p] = true;
      for (int64_t i = 0; i < pr.m; ++i)
        for (int64_t n = 0; n < pr.n_len; ++n) pr.y[i * pr.ldy + n] += acc[i * pr.n_len + n];
    }
}

// Segments: rows [start, start + count) of x (sorted by expert) times expert e's input-major matrix, into the same
// rows of y. w [E, K, N], x [S, K] and y [S, N] contiguous.
void segment_gemm_input_major(at::Tensor w, at::Tensor x, at::Tensor experts, at::Tensor starts, at::Tensor counts,
                              at::Tensor y, int64_t threads) {
  run_input_major(segment_products(w, x, experts, starts, counts, y, true, "segment_gemm_input_major"), threads);
}
