// Memory-bound products (fp32): every output element is a dot product of one contiguous weight row with one input
// row. A call is a list of tasks (a weight matrix, the few input rows it multiplies, where the outputs go); all the
// weight rows of all tasks are cut into blocks and OpenMP gives each core a contiguous run of them, so each core
// streams long stretches of memory (what the hardware prefetchers follow best) and every weight row is read once,
// for all the input rows of its task. AVX2/FMA with four accumulators where the CPU has them, plain C++ otherwise.
#include <torch/extension.h>

#include <algorithm>
#include <vector>
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

// y[j * y_stride + n] = dot(w[n, :], x[j * x_stride, :]) for weight rows n < rows and input rows j < m.
struct Task {
  const float* w;
  int64_t rows;
  const float* x;
  int64_t x_stride;
  int64_t m;
  float* y;
  int64_t y_stride;
};

static void run_tasks(const std::vector<Task>& tasks, int64_t k_len, int64_t threads) {
  constexpr int64_t block = 16;  // weight rows per work item
  std::vector<int64_t> first_block(tasks.size() + 1, 0);
  for (size_t i = 0; i < tasks.size(); ++i) first_block[i + 1] = first_block[i] + (tasks[i].rows + block - 1) / block;
  const int64_t blocks = first_block.back();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    const size_t i = std::upper_bound(first_block.begin(), first_block.end(), b) - first_block.begin() - 1;
    const Task& t = tasks[i];
    const int64_t n0 = (b - first_block[i]) * block, n1 = std::min(n0 + block, t.rows);
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = t.w + n * k_len;
      for (int64_t j = 0; j < t.m; ++j) t.y[j * t.y_stride + n] = dot(row, t.x + j * t.x_stride, k_len);
    }
  }
}

static void check_fp32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dtype() == torch::kFloat32, "moekit kernel: ", what, " must be fp32 on the CPU");
}

// Few-row segments: rows [start, start + count) of x (sorted by expert) times expert e's matrix, into the same rows
// of y. w [E, N, K] contiguous; x [S, K] and y [S, N] contiguous.
void segment_gemm(torch::Tensor w, torch::Tensor x, torch::Tensor experts, torch::Tensor starts,
                  torch::Tensor counts, torch::Tensor y, int64_t threads) {
  check_fp32(w, "w"), check_fp32(x, "x"), check_fp32(y, "y");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous() && y.is_contiguous(), "segment_gemm: contiguous only");
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2 && w.size(2) == x.size(1), "segment_gemm: shapes");
  const int64_t n_len = w.size(1), k_len = w.size(2);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == n_len, "segment_gemm: output shape");
  const int64_t* ep = experts.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t i = 0; i < experts.size(0); ++i) {
    TORCH_CHECK(ep[i] >= 0 && ep[i] < w.size(0) && sp[i] >= 0 && cp[i] >= 0 && sp[i] + cp[i] <= x.size(0),
                "segment_gemm: ranges");
    tasks.push_back({w.data_ptr<float>() + ep[i] * n_len * k_len, n_len, x.data_ptr<float>() + sp[i] * k_len, k_len,
                     cp[i], y.data_ptr<float>() + sp[i] * n_len, n_len});
  }
  run_tasks(tasks, k_len, threads);
}

// One row per task: y[r] = w[ids[r]] @ x[r]. w [E, N, K] contiguous; x [R, K] with unit inner stride and any row
// stride (0: one row shared by all, as the k experts of one token share it); y [R, N] contiguous.
void gather_gemv(torch::Tensor w, torch::Tensor x, torch::Tensor ids, torch::Tensor y, int64_t threads) {
  check_fp32(w, "w"), check_fp32(x, "x"), check_fp32(y, "y");
  TORCH_CHECK(w.is_contiguous() && y.is_contiguous() && x.dim() == 2 && x.stride(1) == 1, "gather_gemv: layout");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == x.size(1) && ids.dim() == 1 && ids.size(0) == x.size(0), "gather_gemv: shapes");
  const int64_t n_len = w.size(1), k_len = w.size(2);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == n_len, "gather_gemv: output shape");
  TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.is_contiguous() && ids.device().is_cpu(), "gather_gemv: ids");
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
void linear_gemv(std::vector<torch::Tensor> ws, torch::Tensor x, std::vector<torch::Tensor> ys, int64_t threads) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segment_gemm", &segment_gemm);
  m.def("gather_gemv", &gather_gemv);
  m.def("linear_gemv", &linear_gemv);
}
