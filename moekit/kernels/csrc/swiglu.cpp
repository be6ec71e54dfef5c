// SwiGLU over a batch of expert rows, forward and backward, each in one pass: a = silu(gate) * up from
// concatenated [gate | up] rows, and from da the gradient [dgate | dup] written in place of a concatenation. torch's
// composition (silu, a product, their backward passes and the cat that joins the two halves) passes over the rows
// five or six times (moekit/experts/swiglu.py).
#include "activation.h"
#include "kernels.h"

namespace {

void check_pair(const at::Tensor& h, const at::Tensor& a, const char* what) {
  check_fp32(h, what), check_fp32(a, what);
  TORCH_CHECK(h.dim() == 2 && a.dim() == 2 && h.is_contiguous() && a.is_contiguous() && h.size(0) == a.size(0) &&
                  h.size(1) == 2 * a.size(1),
              what, ": shapes");
}

// dg, du of a = silu(g) * u for one row of f gates and ups.
void backward_row(const float* g, const float* u, const float* da, float* dg, float* du, int64_t f) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= f; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i), dav = _mm256_loadu_ps(da + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    const __m256 silu = _mm256_mul_ps(gv, sig);
    _mm256_storeu_ps(du + i, _mm256_mul_ps(dav, silu));
    // silu'(g) = sig * (1 + g * (1 - sig)) = sig + silu * (1 - sig)
    const __m256 dsilu = _mm256_fmadd_ps(silu, _mm256_sub_ps(one, sig), sig);
    _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(dav, uv), dsilu));
  }
#endif
  for (; i < f; ++i) {
    const float sig = 1.f / (1.f + std::exp(-g[i])), silu = g[i] * sig;
    du[i] = da[i] * silu;
    dg[i] = da[i] * u[i] * (sig + silu * (1.f - sig));
  }
}

}  // namespace

// a[s] = silu(h[s, :f]) * h[s, f:] for every row s.
void swiglu_rows(at::Tensor h, at::Tensor a, int64_t threads) {
  check_pair(h, a, "swiglu_rows");
  const int64_t rows = a.size(0), f = a.size(1);
  const float* hp = h.data_ptr<float>();
  float* ap = a.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t s = 0; s < rows; ++s) activate(hp + s * 2 * f, ap + s * f, f, true, false, kSilu, 0.f, 0.f);
}

// dh[s] = [dgate | dup] of swiglu_rows for the gradient da of its output.
void swiglu_rows_backward(at::Tensor h, at::Tensor da, at::Tensor dh, int64_t threads) {
  check_pair(h, da, "swiglu_rows_backward"), check_pair(dh, da, "swiglu_rows_backward");
  const int64_t rows = da.size(0), f = da.size(1);
  const float *hp = h.data_ptr<float>(), *dap = da.data_ptr<float>();
  float* dhp = dh.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t s = 0; s < rows; ++s) {
    const float* hs = hp + s * 2 * f;
    float* dhs = dhp + s * 2 * f;
    backward_row(hs, hs + f, dap + s * f, dhs, dhs + f, f);
  }
}
