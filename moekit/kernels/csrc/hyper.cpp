// DeepSeek-V4's hyper-connection weights for a batch of tokens in one call: per token, the RMS-normed flattened
// streams through fn, then pre (collapse), post (spread) and the Sinkhorn-normalised comb (mix). In eager PyTorch
// the Sinkhorn iterations alone are some 120 small operators per block, each with its fixed cost; at one token a
// step of a 43-layer model spends more on them than on its weights.
#include <cmath>

#include "kernels.h"

// x [T, n, D]; fn [(2 + n) n, n D], base [(2 + n) n], scale [3]; post [T, n], comb [T, n, n], collapsed [T, D]
// (all fp32, contiguous) are written. Sums run in the same order as the PyTorch reference (moekit/layers/hyper.py).
void hyper_weights(at::Tensor x, at::Tensor fn, at::Tensor base, at::Tensor scale, int64_t iters, double eps,
                   double norm_eps, at::Tensor post, at::Tensor comb, at::Tensor collapsed, int64_t threads) {
  for (const at::Tensor* t : {&x, &fn, &base, &scale, &post, &comb, &collapsed}) {
    check_fp32(*t, "hyper_weights input");
    TORCH_CHECK(t->is_contiguous(), "hyper_weights: contiguous tensors only");
  }
  TORCH_CHECK(x.dim() == 3, "hyper_weights: x [T, n, D]");
  const int64_t tokens = x.size(0), n = x.size(1), d = x.size(2), width = (2 + n) * n, flat = n * d;
  TORCH_CHECK(fn.dim() == 2 && fn.size(0) == width && fn.size(1) == flat && base.numel() == width &&
                  scale.numel() == 3 && post.numel() == tokens * n && comb.numel() == tokens * n * n &&
                  collapsed.numel() == tokens * d && iters >= 1,
              "hyper_weights: shapes");
  const float e = static_cast<float>(eps), ne = static_cast<float>(norm_eps);
  const float *xp = x.data_ptr<float>(), *fp = fn.data_ptr<float>(), *bp = base.data_ptr<float>();
  const float *sp = scale.data_ptr<float>();
#pragma omp parallel for num_threads(threads) if (tokens > 1)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = xp + t * flat;
    float sum_sq = 0.f;
    for (int64_t i = 0; i < flat; ++i) sum_sq += xt[i] * xt[i];
    const float r = 1.f / std::sqrt(sum_sq / static_cast<float>(flat) + ne);
    std::vector<float> mixes(width);
    for (int64_t k = 0; k < width; ++k) mixes[k] = dot(fp + k * flat, xt, flat) * r;
    std::vector<float> pre(n);
    float* po = post.data_ptr<float>() + t * n;
    float* c = comb.data_ptr<float>() + t * n * n;
    for (int64_t j = 0; j < n; ++j) {
      pre[j] = 1.f / (1.f + std::exp(-(mixes[j] * sp[0] + bp[j]))) + e;
      po[j] = 2.f / (1.f + std::exp(-(mixes[n + j] * sp[1] + bp[n + j])));
    }
    for (int64_t row = 0; row < n; ++row) {  // softmax over each row, plus eps
      float* cr = c + row * n;
      float top = -INFINITY;
      for (int64_t col = 0; col < n; ++col) {
        cr[col] = mixes[2 * n + row * n + col] * sp[2] + bp[2 * n + row * n + col];
        top = std::max(top, cr[col]);
      }
      float total = 0.f;
      for (int64_t col = 0; col < n; ++col) total += (cr[col] = std::exp(cr[col] - top));
      for (int64_t col = 0; col < n; ++col) cr[col] = cr[col] / total + e;
    }
    const auto columns = [&] {
      for (int64_t col = 0; col < n; ++col) {
        float s = 0.f;
        for (int64_t row = 0; row < n; ++row) s += c[row * n + col];
        for (int64_t row = 0; row < n; ++row) c[row * n + col] /= s + e;
      }
    };
    columns();
    for (int64_t it = 1; it < iters; ++it) {  // Sinkhorn-Knopp: rows, then columns
      for (int64_t row = 0; row < n; ++row) {
        float s = 0.f;
        for (int64_t col = 0; col < n; ++col) s += c[row * n + col];
        for (int64_t col = 0; col < n; ++col) c[row * n + col] /= s + e;
      }
      columns();
    }
    float* out = collapsed.data_ptr<float>() + t * d;
    std::fill(out, out + d, 0.f);
    for (int64_t j = 0; j < n; ++j) axpy(pre[j], xt + j * d, out, d);
  }
}
