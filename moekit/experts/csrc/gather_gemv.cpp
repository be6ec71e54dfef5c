// Decode-time products of one row per expert: y[r, n] = sum_k w[ids[r], n, k] * x[r, k] (fp32, contiguous).
// Every (row, n) dot product reads one contiguous weight row; OpenMP spreads them over the cores so all of them
// stream the weights at once. AVX2/FMA with four accumulators where the CPU has them, plain C++ otherwise.
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

torch::Tensor gather_gemv(torch::Tensor w, torch::Tensor ids, torch::Tensor x, int64_t threads) {
  TORCH_CHECK(w.dtype() == torch::kFloat32 && x.dtype() == torch::kFloat32, "gather_gemv: fp32 only");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous() && ids.is_contiguous(), "gather_gemv: contiguous only");
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2 && ids.dim() == 1 && ids.size(0) == x.size(0), "gather_gemv: shapes");
  TORCH_CHECK(w.size(2) == x.size(1) && ids.dtype() == torch::kInt64, "gather_gemv: shapes");
  const int64_t rows = x.size(0), n_len = w.size(1), k_len = w.size(2), experts = w.size(0);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < experts, "gather_gemv: expert id out of range");
  auto y = torch::empty({rows, n_len}, x.options());
  const float* wp = w.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < rows * n_len; ++t) {
    const int64_t r = t / n_len, n = t % n_len;
    yp[t] = dot(wp + (ip[r] * n_len + n) * k_len, xp + r * k_len, k_len);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gather_gemv", &gather_gemv); }
