// Memory-bound products (fp32): every output element is a dot product of one contiguous weight row with one input
// row. A call is a list of tasks (a weight matrix, the few input rows it multiplies, where the outputs go); all the
// weight rows of all tasks are cut into blocks and each core gets a contiguous run of them, which it reads as four
// long sequential streams (what the hardware prefetchers follow best), every weight row once, for all the input rows
// of its task. AVX2/FMA where the CPU has them, plain C++ otherwise.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

inline float dot(const float* a, const float* b, int64_t k_len) {
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

// y[i * ldy + j * ldc] = dot(x row i, w row j) for i < MR, j < NR; rows are K long, x rows ldx apart, w rows ldw
// apart. It also prefetches PF streams (pf_stride apart) at `prefetch`, one 64-byte line each every kEvery floats of
// K (template parameters: a run-time test in the loop costs a third of the speed); `add` adds the sums to y.
template <int MR, int NR, int PF = 0, int kEvery = 16>
inline void dot_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k_len, float* y, int64_t ldy,
                     const float* prefetch = nullptr, int64_t pf_stride = 0, bool add = false, int64_t ldc = 1) {
  int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (; k + 8 <= k_len; k += 8) {
    // the prefetches before the loads: with the weight vectors live across this branch GCC 12 ran out of
    // registers and kept an accumulator on the stack (0.55-0.7x the speed in L1)
    if (PF && (k % kEvery) == 0)
      for (int j = 0; j < PF; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + j * pf_stride + k * 16 / kEvery), _MM_HINT_T0);
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if constexpr (NR == 4) {  // four sums per row at once
    if (k == k_len) {
      for (int i = 0; i < MR; ++i) {
        const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[i][0], acc[i][1]), _mm256_hadd_ps(acc[i][2], acc[i][3]));
        __m128 sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        float* yi = y + i * ldy;
        if (ldc == 1) {  // one store
          _mm_storeu_ps(yi, add ? _mm_add_ps(sums, _mm_loadu_ps(yi)) : sums);
          continue;
        }
        alignas(16) float lanes[4];
        _mm_store_ps(lanes, sums);
        for (int j = 0; j < 4; ++j) yi[j * ldc] = add ? yi[j * ldc] + lanes[j] : lanes[j];
      }
      return;
    }
  }
#endif
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float v = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i][j]), _mm256_extractf128_ps(acc[i][j], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      v = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#endif
      for (int64_t kk = k; kk < k_len; ++kk) v += x[i * ldx + kk] * w[j * ldw + kk];
      y[i * ldy + j * ldc] = add ? y[i * ldy + j * ldc] + v : v;
    }
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

constexpr int64_t kRowsPerBlock = 16;  // weight rows per work item

// Work items of a list of n items of rows(i) weight rows each: item i owns blocks [first[i], first[i + 1]).
template <class Rows>
std::vector<int64_t> first_blocks(size_t n, Rows rows) {
  std::vector<int64_t> first(n + 1, 0);
  for (size_t i = 0; i < n; ++i) first[i + 1] = first[i] + (rows(i) + kRowsPerBlock - 1) / kRowsPerBlock;
  return first;
}

// fn(i, r0, r1) for every item's share of one thread's run of blocks [b0, b1): its weight rows [r0, r1), the whole
// share at once (the kernels read it as four streams: the longer, the better).
template <class Rows, class F>
void for_each_share(const std::vector<int64_t>& first, int64_t b0, int64_t b1, Rows rows, F fn) {
  size_t i = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
  for (int64_t b = b0; b < b1;) {
    while (b >= first[i + 1]) ++i;  // items of no rows own no blocks
    const int64_t end = std::min(b1, first[i + 1]);
    fn(i, (b - first[i]) * kRowsPerBlock, std::min((end - first[i]) * kRowsPerBlock, rows(i)));
    b = end;
  }
}

// Weight rows [r0, r1) of a task as four sequential streams, its quarters side by side, a tile taking row s of each.
// Measured against four neighbouring rows at a time (rows of a page or more) or one row after another (shorter):
// 1.3x for Qwen3-shaped experts, 1.04-1.05x for Mixtral's, more lines in flight than a large sum keeps.
inline void stream_rows(const Task& t, int64_t r0, int64_t r1, int64_t k_len) {
  const int64_t q = (r1 - r0) / 4;
  for (int64_t s = 0; s < q; ++s)
    for (int64_t j = 0; j < t.m; ++j)
      dot_tile<1, 4>(t.x + j * t.x_stride, 0, t.w + (r0 + s) * k_len, q * k_len, k_len, t.y + j * t.y_stride + r0 + s,
                     0, nullptr, 0, false, q);
  for (int64_t n = r0 + 4 * q; n < r1; ++n)
    for (int64_t j = 0; j < t.m; ++j) t.y[j * t.y_stride + n] = dot(t.w + n * k_len, t.x + j * t.x_stride, k_len);
}

// fn(o) for every row of [r0, r1), taking row s of each quarter in turn: four sequential streams, as stream_rows
// reads fp32 rows (one row after another leaves the int4 kernel at 14 GB/s of a 32 GB/s machine).
template <class F>
inline void quarter_rows(int64_t r0, int64_t r1, F fn) {
  const int64_t q = (r1 - r0) / 4;
  for (int64_t s = 0; s < q; ++s)
    for (int64_t j = 0; j < 4; ++j) fn(r0 + j * q + s);
  for (int64_t o = r0 + 4 * q; o < r1; ++o) fn(o);
}

inline void run_tasks(const std::vector<Task>& tasks, int64_t k_len, int64_t threads) {
  const auto rows = [&](size_t i) { return tasks[i].rows; };
  const std::vector<int64_t> first = first_blocks(tasks.size(), rows);
  const int64_t blocks = first.back();
#pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int64_t part = 0; part < threads; ++part)  // one contiguous run of blocks per thread
    for_each_share(first, blocks * part / threads, blocks * (part + 1) / threads, rows,
                   [&](size_t i, int64_t r0, int64_t r1) { stream_rows(tasks[i], r0, r1, k_len); });
}

// y[:n] += a * w[:n]
inline void axpy(float a, const float* w, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(av, _mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(y + i + 8)));
  }
#endif
  for (; i < n; ++i) y[i] += a * w[i];
}

// 1 / rms(x) over n values.
inline float inverse_rms(const float* x, int64_t n, float eps) {
  float sum_sq = 0.f;
  for (int64_t i = 0; i < n; ++i) sum_sq += x[i] * x[i];
  return 1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
}
// y = x / rms(x) * w over n values (y may be x; w null: no weight).
inline void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  const float r = inverse_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w ? x[i] * r * w[i] : x[i] * r;
}

// The (experts, starts, counts) table of a segment call: every expert id below num_experts, every segment inside
// the rows and at most max_count long.
inline void check_segments(const at::Tensor& experts, const at::Tensor& starts, const at::Tensor& counts,
                           int64_t num_experts, int64_t rows, int64_t max_count, const char* what) {
  const int64_t* ep = experts.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < experts.size(0); ++i)
    TORCH_CHECK(ep[i] >= 0 && ep[i] < num_experts && sp[i] >= 0 && cp[i] >= 0 && cp[i] <= max_count &&
                    sp[i] + cp[i] <= rows,
                what, ": segment ranges");
}

// An optional input's data: nullptr for an empty tensor.
inline const float* data_or_null(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

inline void check_fp32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dtype() == at::kFloat, "moekit kernel: ", what, " must be fp32 on the CPU");
}

// y[i * ldy + n] = dot(x row i, w row n) for input rows i < m (ldx apart) and weight rows n < n_len (k_len long,
// contiguous): one expert's segment of a few hundred rows at most (segment_gemm.cpp). Input-major products read
// w as [k_len, n_len] instead (run_input_major).
struct Product {
  const float* w;
  int64_t n_len, k_len;
  const float* x;
  int64_t ldx, m;
  float* y;
  int64_t ldy;
};
// The (expert, start, count) segments of x [S, K] (rows sorted by expert) as products with their experts' matrices,
// into the same rows of y [S, N]: w [E, N, K] or, input-major, [E, K, N]; all contiguous fp32. Empty segments are
// left out.
inline std::vector<Product> segment_products(const at::Tensor& w, const at::Tensor& x, const at::Tensor& experts,
                                             const at::Tensor& starts, const at::Tensor& counts, const at::Tensor& y,
                                             bool input_major, const char* what) {
  check_fp32(w, "w"), check_fp32(x, "x"), check_fp32(y, "y");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous() && y.is_contiguous(), what, ": contiguous only");
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2, what, ": shapes");
  const int64_t n_len = w.size(input_major ? 2 : 1), k_len = w.size(input_major ? 1 : 2);
  TORCH_CHECK(x.size(1) == k_len, what, ": shapes");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == n_len, what, ": output shape");
  check_segments(experts, starts, counts, w.size(0), x.size(0), x.size(0), what);
  const int64_t* ep = experts.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<Product> products;
  for (int64_t s = 0; s < experts.size(0); ++s)
    if (cp[s])
      products.push_back({w.data_ptr<float>() + ep[s] * n_len * k_len, n_len, k_len,
                          x.data_ptr<float>() + sp[s] * k_len, k_len, cp[s], y.data_ptr<float>() + sp[s] * n_len, n_len});
  return products;
}
// Every product's weight rows cut into runs, spread over the threads; each weight row is read from memory once.
void run_products(const std::vector<Product>& products, int64_t threads);
// The same for input-major weights (w [k_len, n_len]: y = x @ w, as GPT-OSS and Llama 4 keep their experts, and
// as every expert's input gradient reads its weights), each weight row read once for all input rows
// (input_major.cpp).
void run_input_major(const std::vector<Product>& products, int64_t threads);
// The most rows an input-major product / a product (run_products) may have for moekit's kernels to take it.
constexpr int64_t kInputMajorRows = 32;
constexpr int64_t kTiledRows = 192;
// Where the fused block over tokens hands a product to MKL instead (at most the bounds above): set from Python
// for this CPU (moekit/kernels/limits.py) when the module is loaded.
inline std::atomic<int64_t> g_tiled_rows{kTiledRows}, g_input_major_rows{kInputMajorRows};
void set_row_limits(int64_t tiled_rows, int64_t input_major_rows);

// The functions the extension exports (bindings.cpp).
void segment_gemm(at::Tensor w, at::Tensor x, at::Tensor experts, at::Tensor starts,
                  at::Tensor counts, at::Tensor y, int64_t threads);
void segment_gemm_input_major(at::Tensor w, at::Tensor x, at::Tensor experts, at::Tensor starts, at::Tensor counts,
                              at::Tensor y, int64_t threads);
void segment_grad_weight(at::Tensor x, at::Tensor dy, at::Tensor experts, at::Tensor starts, at::Tensor counts,
                         at::Tensor dw, int64_t threads);
void gather_gemv(at::Tensor w, at::Tensor x, at::Tensor ids, at::Tensor y, int64_t threads);
void linear_gemv(std::vector<at::Tensor> ws, at::Tensor x, std::vector<at::Tensor> ys, int64_t threads);
// A stack of quantized matrices [E, O, I] as the checkpoint holds them (quant_gemv.cpp): format 0 INT8, 1 INT4
// (compressed-tensors pack-quantized: codes = the int32 words as bytes, bf16 scales [E, O, I / 32], zero points
// [E, ceil(O * bits / 32), I / 32] int32 or empty), 2 MXFP4 (codes [E, O, I / 2], UE8M0 scales), 3 FP8 e4m3
// (codes [E, O, I], fp32 scale_inv per block_rows x block_cols block of each of `pieces` row blocks). cols = I.
class QuantWeights {
 public:
  QuantWeights(int64_t format, at::Tensor codes, at::Tensor scales, at::Tensor zero_points, int64_t block_rows,
               int64_t block_cols, int64_t pieces, int64_t cols);
  // ys[r][:rows] = dequantized(matrix ids[r]) @ xs[r][:cols] for r < n; the integer formats round each distinct
  // input row (consecutive equal pointers count once) to int8 per group of 32.
  void products(const int64_t* ids, const float* const* xs, float* const* ys, int64_t n, int64_t threads) const;
  // out[r] [rows, cols] = dequantized(matrix ids[r]) for r < n, exactly as moekit/quant computes it
  // (quant_dequantize.cpp).
  void dequantize(const int64_t* ids, int64_t n, float* out, int64_t threads) const;

  int64_t format, experts, rows, cols;

 private:
  at::Tensor codes_, scales_, zero_points_;
  int64_t block_rows_, block_cols_, pieces_;
};
void quant_gemv(const QuantWeights& w, at::Tensor ids, at::Tensor x, at::Tensor y, int64_t threads);
void quant_dequantize(const QuantWeights& w, at::Tensor ids, at::Tensor out, int64_t threads);
// y[:rows] = dequantized(matrix 0 of w) @ x: a fused step's quantized linear layer.
inline void quant_row(const QuantWeights& w, const float* x, float* y, int64_t threads) {
  const int64_t zero = 0;
  w.products(&zero, &x, &y, 1, threads);
}
void slot_sums(at::Tensor rows, at::Tensor slot_row, at::Tensor weights, at::Tensor out, int64_t k, int64_t threads);
void row_grads(at::Tensor grad, at::Tensor token, at::Tensor rows, at::Tensor w_row, at::Tensor d_rows, at::Tensor d_w,
               int64_t threads);
void swiglu_rows(at::Tensor h, at::Tensor a, int64_t threads);
// One token of DeepSeek-V4's hyper-connections (hyper.cpp), x [n, D] the streams: a block's weights (post [n], comb
// [n, n] and its input collapsed [D]); the streams after it (y [n, D]); the head's collapse [D].
void hyper_token(const float* x, const float* fn, const float* base, const float* scale, int64_t n, int64_t d,
                 int64_t iters, float eps, float norm_eps, float* post, float* comb, float* collapsed, int64_t threads);
void hyper_mix_token(const float* x, const float* out, const float* post, const float* comb, int64_t n, int64_t d,
                     float* y);
void hyper_head_token(const float* x, const float* fn, const float* base, float scale, int64_t n, int64_t d,
                      float eps, float norm_eps, float* collapsed, int64_t threads);
void hyper_weights(at::Tensor x, at::Tensor fn, at::Tensor base, at::Tensor scale, int64_t iters, double eps,
                   double norm_eps, at::Tensor post, at::Tensor comb, at::Tensor collapsed, int64_t threads);
void hyper_mix(at::Tensor x, at::Tensor out, at::Tensor post, at::Tensor comb, at::Tensor y, int64_t threads);
void swiglu_rows_backward(at::Tensor h, at::Tensor da, at::Tensor dh, int64_t threads);
void mm_tasks(std::vector<at::Tensor> a, std::vector<at::Tensor> b, std::vector<at::Tensor> out,
              std::vector<at::Tensor> zero, int64_t threads);
// The sum of x's elements, each thread reading its share as four streams (read_probe.cpp): a bandwidth probe.
double read_probe(at::Tensor x, int64_t threads);
