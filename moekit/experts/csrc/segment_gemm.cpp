// Memory-bound expert products (fp32, contiguous): every output element is a dot product of one contiguous weight
// row with one input row; OpenMP spreads blocks of weight rows over the cores so all of them stream the weights
// at once. AVX2/FMA with four accumulators where the CPU has them, plain C++ otherwise.
#include <torch/extension.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static inline float dot(const float* a, const float* b, int64_t k_len) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; k + 32 <= k_len; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), _mm256_loadu_ps(b + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), _mm256_loadu_ps(b + k + 24), a3);
  }
  float buf[8];
  _mm256_storeu_ps(buf, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  acc = ((buf[0] + buf[4]) + (buf[1] + buf[5])) + ((buf[2] + buf[6]) + (buf[3] + buf[7]));
#endif
  for (; k < k_len; ++k) acc += a[k] * b[k];
  return acc;
}

// Few-row segments: rows [start_e, start_e + count_e) of x (sorted by expert) times expert e's matrix, into y.
// y[m, n] = sum_k w[e, n, k] * x[m, k]. Each weight row is read from memory once and reused from L1 for all rows
// of its segment; OpenMP spreads (expert, block of weight rows) items over the cores.
void segment_gemm(torch::Tensor w, torch::Tensor x, torch::Tensor experts, torch::Tensor starts,
                  torch::Tensor counts, torch::Tensor y, int64_t threads) {
  TORCH_CHECK(w.dtype() == torch::kFloat32 && x.dtype() == torch::kFloat32, "segment_gemm: fp32 only");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous(), "segment_gemm: contiguous only");
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2 && w.size(2) == x.size(1), "segment_gemm: shapes");
  const int64_t n_len = w.size(1), k_len = w.size(2), items = experts.size(0), block = 16;
  const int64_t* ep = experts.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < items; ++i)
    TORCH_CHECK(ep[i] >= 0 && ep[i] < w.size(0) && sp[i] >= 0 && sp[i] + cp[i] <= x.size(0), "segment_gemm: ranges");
  TORCH_CHECK(y.is_contiguous() && y.dtype() == torch::kFloat32 && y.size(0) == x.size(0) && y.size(1) == n_len,
              "segment_gemm: output");
  const float* wp = w.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (n_len + block - 1) / block;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
  for (int64_t t = 0; t < items * blocks; ++t) {
    const int64_t i = t / blocks, n0 = (t % blocks) * block, n1 = std::min(n0 + block, n_len);
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = wp + (ep[i] * n_len + n) * k_len;
      for (int64_t m = sp[i]; m < sp[i] + cp[i]; ++m) yp[m * n_len + n] = dot(row, xp + m * k_len, k_len);
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("segment_gemm", &segment_gemm); }
