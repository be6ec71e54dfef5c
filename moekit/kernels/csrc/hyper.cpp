// DeepSeek-V4's hyper-connections (moekit/layers/hyper.py is the reference): per token, the RMS-normed flattened
// streams through fn, then pre (collapse), post (spread) and the Sinkhorn-normalised comb (mix); after a block the
// streams mixed by comb plus its output spread by post; before the head, the last collapse. In eager PyTorch the
// Sinkhorn iterations alone are some 120 small operators per block, each with its fixed cost; at one token a step
// of a 43-layer model spends more on them than on its weights.
#include <cmath>

#include "kernels.h"

static float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

void hyper_token(const float* x, const float* fn, const float* base, const float* scale, int64_t n, int64_t d,
                 int64_t iters, float eps, float norm_eps, float* post, float* comb, float* collapsed,
                 int64_t threads) {
  const int64_t width = (2 + n) * n, flat = n * d;
  std::vector<float> mixes(width), pre(n);
  run_tasks({{fn, width, x, 0, 1, mixes.data(), 0}}, flat, threads);
  const float r = inverse_rms(x, flat, norm_eps);
  for (float& m : mixes) m *= r;
  for (int64_t j = 0; j < n; ++j) {
    pre[j] = sigmoid(mixes[j] * scale[0] + base[j]) + eps;
    post[j] = 2.f * sigmoid(mixes[n + j] * scale[1] + base[n + j]);
  }
  for (int64_t row = 0; row < n; ++row) {  // softmax over each row, plus eps
    float* cr = comb + row * n;
    float top = -INFINITY;
    for (int64_t col = 0; col < n; ++col) {
      cr[col] = mixes[2 * n + row * n + col] * scale[2] + base[2 * n + row * n + col];
      top = std::max(top, cr[col]);
    }
    float total = 0.f;
    for (int64_t col = 0; col < n; ++col) total += (cr[col] = std::exp(cr[col] - top));
    for (int64_t col = 0; col < n; ++col) cr[col] = cr[col] / total + eps;
  }
  const auto columns = [&] {
    for (int64_t col = 0; col < n; ++col) {
      float s = 0.f;
      for (int64_t row = 0; row < n; ++row) s += comb[row * n + col];
      for (int64_t row = 0; row < n; ++row) comb[row * n + col] /= s + eps;
    }
  };
  columns();
  for (int64_t it = 1; it < iters; ++it) {  // Sinkhorn-Knopp: rows, then columns
    for (int64_t row = 0; row < n; ++row) {
      float s = 0.f;
      for (int64_t col = 0; col < n; ++col) s += comb[row * n + col];
      for (int64_t col = 0; col < n; ++col) comb[row * n + col] /= s + eps;
    }
    columns();
  }
  std::fill(collapsed, collapsed + d, 0.f);
  for (int64_t j = 0; j < n; ++j) axpy(pre[j], x + j * d, collapsed, d);
}

void hyper_mix_token(const float* x, const float* out, const float* post, const float* comb, int64_t n, int64_t d,
                     float* y) {
  std::vector<float> mixed(d);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(mixed.begin(), mixed.end(), 0.f);
    for (int64_t j = 0; j < n; ++j) axpy(comb[j * n + i], x + j * d, mixed.data(), d);
    for (int64_t k = 0; k < d; ++k) y[i * d + k] = post[i] * out[k] + mixed[k];
  }
}

void hyper_head_token(const float* x, const float* fn, const float* base, float scale, int64_t n, int64_t d,
                      float eps, float norm_eps, float* collapsed, int64_t threads) {
  std::vector<float> pre(n);
  run_tasks({{fn, n, x, 0, 1, pre.data(), 0}}, n * d, threads);
  const float r = inverse_rms(x, n * d, norm_eps);
  std::fill(collapsed, collapsed + d, 0.f);
  for (int64_t j = 0; j < n; ++j) axpy(sigmoid(pre[j] * r * scale + base[j]) + eps, x + j * d, collapsed, d);
}

static void check_all(std::initializer_list<const at::Tensor*> tensors, const char* what) {
  for (const at::Tensor* t : tensors) {
    check_fp32(*t, what);
    TORCH_CHECK(t->is_contiguous(), what, ": contiguous tensors only");
  }
}

// x [T, n, D]; fn [(2 + n) n, n D], base [(2 + n) n], scale [3]; post [T, n], comb [T, n, n], collapsed [T, D]
// (all fp32, contiguous) are written. At one token fn's rows are spread over the threads (one core reads it at a
// third of the machine's bandwidth); for more, each token runs on its own thread.
void hyper_weights(at::Tensor x, at::Tensor fn, at::Tensor base, at::Tensor scale, int64_t iters, double eps,
                   double norm_eps, at::Tensor post, at::Tensor comb, at::Tensor collapsed, int64_t threads) {
  check_all({&x, &fn, &base, &scale, &post, &comb, &collapsed}, "hyper_weights");
  TORCH_CHECK(x.dim() == 3, "hyper_weights: x [T, n, D]");
  const int64_t tokens = x.size(0), n = x.size(1), d = x.size(2), width = (2 + n) * n;
  TORCH_CHECK(fn.dim() == 2 && fn.size(0) == width && fn.size(1) == n * d && base.numel() == width &&
                  scale.numel() == 3 && post.numel() == tokens * n && comb.numel() == tokens * n * n &&
                  collapsed.numel() == tokens * d && iters >= 1,
              "hyper_weights: shapes");
  const float *xp = x.data_ptr<float>(), *fp = fn.data_ptr<float>(), *bp = base.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
#pragma omp parallel for num_threads(threads) if (tokens > 1)
  for (int64_t t = 0; t < tokens; ++t)
    hyper_token(xp + t * n * d, fp, bp, sp, n, d, iters, static_cast<float>(eps), static_cast<float>(norm_eps),
                post.data_ptr<float>() + t * n, comb.data_ptr<float>() + t * n * n,
                collapsed.data_ptr<float>() + t * d, tokens > 1 ? 1 : threads);
}

// The streams after a block, y [T, n, D] = post * out + comb^T @ x for x [T, n, D], out [T, D], post [T, n],
// comb [T, n, n] (fp32, contiguous): one call where eager PyTorch takes seven operators.
void hyper_mix(at::Tensor x, at::Tensor out, at::Tensor post, at::Tensor comb, at::Tensor y, int64_t threads) {
  check_all({&x, &out, &post, &comb, &y}, "hyper_mix");
  TORCH_CHECK(x.dim() == 3, "hyper_mix: x [T, n, D]");
  const int64_t tokens = x.size(0), n = x.size(1), d = x.size(2);
  TORCH_CHECK(out.numel() == tokens * d && post.numel() == tokens * n && comb.numel() == tokens * n * n &&
                  y.numel() == x.numel(),
              "hyper_mix: shapes");
#pragma omp parallel for num_threads(threads) if (tokens > 1)
  for (int64_t t = 0; t < tokens; ++t)
    hyper_mix_token(x.data_ptr<float>() + t * n * d, out.data_ptr<float>() + t * d, post.data_ptr<float>() + t * n,
                    comb.data_ptr<float>() + t * n * n, n, d, y.data_ptr<float>() + t * n * d);
}
