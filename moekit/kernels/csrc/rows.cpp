// The row gathers of an MoE layer's combine and of both their backward passes (moekit/dispatch/gather.py): each
// token's k expert rows summed (weighted) in slot order, and each row's share of its token's gradient. One pass over
// the rows each, parallel over tokens or rows, every output written by one thread: deterministic. torch's
// composition of the same (a row gather, then a batched matmul or a sum) passes over the rows two or three times.
#include "kernels.h"

namespace {

void check_rows(const at::Tensor& t, const char* what) {
  check_fp32(t, what);
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "moekit kernel: ", what, " must be a contiguous [rows, D] tensor");
}

// Indices as int64, contiguous, each in [0, bound).
const int64_t* checked_index(const at::Tensor& index, int64_t bound, const char* what) {
  TORCH_CHECK(index.dtype() == at::kLong && index.is_contiguous() && index.dim() == 1, "moekit kernel: ", what,
              " must be a contiguous int64 vector");
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, "moekit kernel: ", what, " out of range");
  return p;
}

// y[:n] = a * x[:n]
void scale(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(av, _mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) y[i] = a * x[i];
}

}  // namespace

// out[t] = sum over j < k, in order, of weights[t, j] * rows[slot_row[t * k + j]] (weights empty: all 1).
void slot_sums(at::Tensor rows, at::Tensor slot_row, at::Tensor weights, at::Tensor out, int64_t k, int64_t threads) {
  check_rows(rows, "rows"), check_rows(out, "out");
  const int64_t tokens = out.size(0), d = out.size(1);
  TORCH_CHECK(k > 0 && rows.size(1) == d && slot_row.numel() == tokens * k, "slot_sums: shapes");
  const int64_t* idx = checked_index(slot_row, rows.size(0), "slot_sums: slot rows");
  const float* w = nullptr;
  if (weights.numel()) {
    check_fp32(weights, "weights");
    TORCH_CHECK(weights.is_contiguous() && weights.numel() == tokens * k, "slot_sums: weights shape");
    w = weights.data_ptr<float>();
  }
  const float* r = rows.data_ptr<float>();
  float* o = out.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tokens; ++t) {
    float* ot = o + t * d;
    scale(w ? w[t * k] : 1.f, r + idx[t * k] * d, ot, d);
    for (int64_t j = 1; j < k; ++j) axpy(w ? w[t * k + j] : 1.f, r + idx[t * k + j] * d, ot, d);
  }
}

// For every row s of token t = token[s]: d_rows[s] = w_row[s] * grad[t] (w_row empty: 1) and, unless d_w is empty,
// d_w[s] = dot(grad[t], rows[s]). d_rows may be empty too.
void row_grads(at::Tensor grad, at::Tensor token, at::Tensor rows, at::Tensor w_row, at::Tensor d_rows, at::Tensor d_w,
               int64_t threads) {
  check_rows(grad, "grad");
  const int64_t n = token.numel(), d = grad.size(1);
  const int64_t* tok = checked_index(token, grad.size(0), "row_grads: tokens");
  const float *g = grad.data_ptr<float>(), *w = nullptr, *r = nullptr;
  float *dr = nullptr, *dw = nullptr;
  if (w_row.numel()) {
    check_fp32(w_row, "w_row");
    TORCH_CHECK(w_row.numel() == n && w_row.is_contiguous(), "row_grads: w_row shape");
    w = w_row.data_ptr<float>();
  }
  if (d_rows.numel()) {
    check_rows(d_rows, "d_rows");
    TORCH_CHECK(d_rows.size(0) == n && d_rows.size(1) == d, "row_grads: d_rows shape");
    dr = d_rows.data_ptr<float>();
  }
  if (d_w.numel()) {
    check_rows(rows, "rows"), check_fp32(d_w, "d_w");
    TORCH_CHECK(rows.size(0) == n && rows.size(1) == d && d_w.numel() == n && d_w.is_contiguous(), "row_grads: shapes");
    r = rows.data_ptr<float>(), dw = d_w.data_ptr<float>();
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t s = 0; s < n; ++s) {
    const float* gs = g + tok[s] * d;
    if (dw) dw[s] = dot(gs, r + s * d, d);
    if (dr) scale(w ? w[s] : 1.f, gs, dr + s * d, d);
  }
}
