// One decode step of a multi-head latent attention block (DeepSeek-V2/V3, Kimi K2, Mistral 4) at batch 1, in one
// call, reading only the compressed cache: the new token's latent and rotary key are written to it, and the
// up-projection kv_b is absorbed into both sides of the attention instead of expanding every cached latent into
// per-head keys and values (which the modules do, and which reads H * (nope + v) / (latent + rope) times more).
// Per head h, with kv_b's key rows K_h [nope, C] and value rows V_h [v, C]:
//   score(s) = scale * ((K_h^T q_nope) . latent_s + q_rope . k_rope_s),   out_h = V_h (sum_s p(s) latent_s).
#include <cmath>

#include "decode.h"

// Rotary embedding of r values: split halves, or adjacent pairs laid out as [evens, odds] after rotation (what
// DeepSeek's interleaved weights expect); cos and sin hold each frequency twice.
static void rotate(float* x, const float* cos, const float* sin, int64_t r, bool interleave) {
  const int64_t half = r / 2;
  if (!interleave) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
    return;
  }
  std::vector<float> pairs(x, x + r);
  for (int64_t i = 0; i < half; ++i) {
    const float a = pairs[2 * i], b = pairs[2 * i + 1];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

static void add_bias(float* y, const at::Tensor& b) {
  const float* bp = data_or_null(b);
  if (bp)
    for (int64_t n = 0; n < b.numel(); ++n) y[n] += bp[n];
}

static void check_linear(const at::Tensor& w, int64_t rows, int64_t cols, const at::Tensor& b, const char* what) {
  check_fp32(w, what);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.is_contiguous(), "mla_decode: ", what);
  if (b.numel()) {
    check_fp32(b, what);
    TORCH_CHECK(b.numel() == rows && b.is_contiguous(), "mla_decode: ", what, " bias");
  }
}

// q_a_w [Q, D] with q_a_b and q_norm_w [Q], then q_b_w [H * (nope + rope), Q]; or no q_a_w: q_b_w [H * (nope +
// rope), D] reads the normed input. kv_a_w [C + rope, D] (+ kv_a_b), kv_norm_w [C], kv_b_w [H * (nope + v), C],
// o_w [D, H * v] (+ o_b). query_beta > 0: queries scaled by 1 + beta * log(1 + floor(pos / query_length)).
MlaDecode::MlaDecode(at::Tensor norm_w, double eps, at::Tensor q_a_w, at::Tensor q_a_b, at::Tensor q_norm_w,
                     at::Tensor q_b_w, at::Tensor kv_a_w, at::Tensor kv_a_b, at::Tensor kv_norm_w, at::Tensor kv_b_w,
                     at::Tensor o_w, at::Tensor o_b, int64_t heads, int64_t nope, int64_t rope, int64_t v,
                     double latent_eps, double scale, bool interleave, double query_beta, int64_t query_length)
    : norm_w_(norm_w), q_a_w_(q_a_w), q_a_b_(q_a_b), q_norm_w_(q_norm_w), q_b_w_(q_b_w), kv_a_w_(kv_a_w),
      kv_a_b_(kv_a_b), kv_norm_w_(kv_norm_w), kv_b_w_(kv_b_w), o_w_(o_w), o_b_(o_b), heads_(heads), nope_(nope),
      rope_(rope), v_(v), eps_(static_cast<float>(eps)), latent_eps_(static_cast<float>(latent_eps)),
      scale_(static_cast<float>(scale)), query_beta_(static_cast<float>(query_beta)), query_length_(query_length),
      interleave_(interleave) {
  check_fp32(norm_w, "norm weight");
  TORCH_CHECK(norm_w.is_contiguous() && heads > 0 && nope >= 0 && rope > 0 && rope % 2 == 0 && v > 0 &&
                  query_length > 0,
              "mla_decode: shapes");
  d = norm_w.numel();
  latent_ = kv_norm_w.numel();
  q_rank_ = q_a_w.numel() ? q_a_w.size(0) : 0;
  if (q_rank_) {
    check_linear(q_a_w, q_rank_, d, q_a_b, "q_a_proj");
    check_fp32(q_norm_w, "q norm");
    TORCH_CHECK(q_norm_w.numel() == q_rank_ && q_norm_w.is_contiguous(), "mla_decode: q norm");
  }
  check_linear(q_b_w, heads * (nope + rope), q_rank_ ? q_rank_ : d, at::Tensor(), "q projection");
  check_linear(kv_a_w, latent_ + rope, d, kv_a_b, "kv_a_proj");
  check_fp32(kv_norm_w, "kv norm");
  TORCH_CHECK(kv_norm_w.is_contiguous(), "mla_decode: kv norm");
  check_linear(kv_b_w, heads * (nope + v), latent_, at::Tensor(), "kv_b_proj");
  check_linear(o_w, d, heads * v, o_b, "o_proj");
}

void MlaDecode::check_caches(const at::Tensor& latents, const at::Tensor& rope_keys, int64_t pos) const {
  check_fp32(latents, "latent cache"), check_fp32(rope_keys, "rope key cache");
  TORCH_CHECK(latents.dim() == 3 && latents.size(0) == 1 && latents.size(2) == latent_ && latents.is_contiguous() &&
                  rope_keys.dim() == 3 && rope_keys.size(0) == 1 && rope_keys.size(2) == rope_ &&
                  rope_keys.is_contiguous() && rope_keys.size(1) == latents.size(1),
              "mla_decode: caches [1, capacity, latent] and [1, capacity, rope]");
  TORCH_CHECK(0 <= pos && pos < latents.size(1), "mla_decode: no room in the cache");
}

at::Tensor MlaDecode::forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor latents, at::Tensor rope_keys,
                              int64_t pos, int64_t threads) const {
  check_fp32(x, "x");
  TORCH_CHECK(x.is_contiguous() && x.numel() == d, "mla_decode: x");
  check_caches(latents, rope_keys, pos);
  TORCH_CHECK(cos.numel() == rope_ && sin.numel() == rope_ && cos.is_contiguous() && sin.is_contiguous(),
              "mla_decode: cos, sin [rope]");
  check_fp32(cos, "cos"), check_fp32(sin, "sin");
  at::Tensor y = at::empty_like(x);
  run(x.data_ptr<float>(), y.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), rope_, latents,
      rope_keys, pos, threads);
  return y;
}

void MlaDecode::run(const float* x, float* y, const float* cos, const float* sin, int64_t r, const at::Tensor& latents,
                    const at::Tensor& rope_keys, int64_t pos, int64_t threads) const {
  TORCH_CHECK(r == rope_, "mla_decode: rotary width");
  const int64_t qk = nope_ + rope_;
  std::vector<float> h(d), q_low(q_rank_), q(heads_ * qk), kv(latent_ + rope_);
  rms_norm(x, norm_w_.data_ptr<float>(), h.data(), d, eps_);
  std::vector<Task> first = {{kv_a_w_.data_ptr<float>(), latent_ + rope_, h.data(), 0, 1, kv.data(), 0}};
  if (q_rank_) first.push_back({q_a_w_.data_ptr<float>(), q_rank_, h.data(), 0, 1, q_low.data(), 0});
  run_tasks(first, d, threads);  // the two projections of the input in one pass
  add_bias(kv.data(), kv_a_b_);
  if (q_rank_) {
    add_bias(q_low.data(), q_a_b_);
    rms_norm(q_low.data(), q_norm_w_.data_ptr<float>(), q_low.data(), q_rank_, latent_eps_);
  }
  run_tasks({{q_b_w_.data_ptr<float>(), heads_ * qk, q_rank_ ? q_low.data() : h.data(), 0, 1, q.data(), 0}},
            q_rank_ ? q_rank_ : d, threads);

  // the new token's cache entries: the normed latent and the rotated key
  float* lc = latents.data_ptr<float>();
  float* rc = rope_keys.data_ptr<float>();
  rms_norm(kv.data(), kv_norm_w_.data_ptr<float>(), lc + pos * latent_, latent_, latent_eps_);
  rotate(kv.data() + latent_, cos, sin, rope_, interleave_);
  std::copy(kv.data() + latent_, kv.data() + latent_ + rope_, rc + pos * rope_);

  float factor = scale_;
  if (query_beta_ > 0)
    factor *= 1.f + query_beta_ * std::log1p(std::floor(static_cast<float>(pos) / static_cast<float>(query_length_)));
  const float* kv_b = kv_b_w_.data_ptr<float>();
  std::vector<float> out(heads_ * v_);
  const int64_t n_keys = pos + 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t hh = 0; hh < heads_; ++hh) {
    float* qh = q.data() + hh * qk;
    rotate(qh + nope_, cos, sin, rope_, interleave_);
    const float* k_rows = kv_b + hh * (nope_ + v_) * latent_;  // K_h, then V_h
    std::vector<float> q_lat(latent_, 0.f), o_lat(latent_, 0.f), s(n_keys);
    for (int64_t n = 0; n < nope_; ++n) axpy(qh[n], k_rows + n * latent_, q_lat.data(), latent_);
    float top = -INFINITY;
    for (int64_t j = 0; j < n_keys; ++j) {
      s[j] = (dot(q_lat.data(), lc + j * latent_, latent_) + dot(qh + nope_, rc + j * rope_, rope_)) * factor;
      top = std::max(top, s[j]);
    }
    float total = 0.f;
    for (int64_t j = 0; j < n_keys; ++j) total += (s[j] = std::exp(s[j] - top));
    for (int64_t j = 0; j < n_keys; ++j) axpy(s[j] / total, lc + j * latent_, o_lat.data(), latent_);
    const float* v_rows = k_rows + nope_ * latent_;
    for (int64_t i = 0; i < v_; ++i) out[hh * v_ + i] = dot(v_rows + i * latent_, o_lat.data(), latent_);
  }

  std::vector<float> projected(d);
  run_tasks({{o_w_.data_ptr<float>(), d, out.data(), 0, 1, projected.data(), 0}}, heads_ * v_, threads);
  const float* ob = data_or_null(o_b_);
  for (int64_t n = 0; n < d; ++n) y[n] = x[n] + (ob ? projected[n] + ob[n] : projected[n]);
}
