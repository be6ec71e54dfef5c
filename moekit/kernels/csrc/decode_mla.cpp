// One decode step of a multi-head latent attention block (DeepSeek-V2/V3, Kimi K2, Mistral 4) at batch 1, in one
// call, reading only the compressed cache: the new token's latent and rotary key are written to it, and the
// up-projection kv_b is absorbed into both sides of the attention instead of expanding every cached latent into
// per-head keys and values (which the modules do, and which reads H * (nope + v) / (latent + rope) times more).
// Per head h, with kv_b's key rows K_h [nope, C] and value rows V_h [v, C]:
//   score(s) = scale * ((K_h^T q_nope) . latent_s + q_rope . k_rope_s),   out_h = V_h (sum_s p(s) latent_s).
// DeepSeek Sparse Attention: the indexer's key of the new token joins its cache, and once more keys are cached than
// index_topk, each head attends only to the index_topk keys of the best index score sum_h w_h relu(q_h . k_s).
#include <algorithm>
#include <cmath>
#include <numeric>

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

// LayerNorm over n values with weight and bias (y may be x).
static void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps) {
  float mean = 0.f, var = 0.f;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float r = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * r * w[i] + b[i];
}

// q_a_w [Q, D] with q_a_b and q_norm_w [Q], then q_b_w [H * (nope + rope), Q]; or no q_a_w: q_b_w [H * (nope +
// rope), D] reads the normed input. kv_a_w [C + rope, D] (+ kv_a_b), kv_norm_w [C], kv_b_w [H * (nope + v), C],
// o_w [D, H * v] (+ o_b). query_beta > 0: queries scaled by 1 + beta * log(1 + floor(pos / query_length)).
// The indexer (empty tensors: none): index_q_w [Hi * Di, Q], index_k_w [Di, D], its LayerNorm [Di] (eps 1e-6),
// index_weights_w [Hi, D]; rope on the first `rope` dims of its heads, interleaved with index_interleave.
MlaDecode::MlaDecode(at::Tensor norm_w, double eps, at::Tensor q_a_w, at::Tensor q_a_b, at::Tensor q_norm_w,
                     at::Tensor q_b_w, at::Tensor kv_a_w, at::Tensor kv_a_b, at::Tensor kv_norm_w, at::Tensor kv_b_w,
                     at::Tensor o_w, at::Tensor o_b, int64_t heads, int64_t nope, int64_t rope, int64_t v,
                     double latent_eps, double scale, bool interleave, double query_beta, int64_t query_length,
                     at::Tensor index_q_w, at::Tensor index_k_w, at::Tensor index_norm_w, at::Tensor index_norm_b,
                     at::Tensor index_weights_w, int64_t index_topk, bool index_interleave)
    : norm_w_(norm_w), q_a_w_(q_a_w), q_a_b_(q_a_b), q_norm_w_(q_norm_w), q_b_w_(q_b_w), kv_a_w_(kv_a_w),
      kv_a_b_(kv_a_b), kv_norm_w_(kv_norm_w), kv_b_w_(kv_b_w), o_w_(o_w), o_b_(o_b), index_q_w_(index_q_w),
      index_k_w_(index_k_w), index_norm_w_(index_norm_w), index_norm_b_(index_norm_b),
      index_weights_w_(index_weights_w), heads_(heads), nope_(nope), rope_(rope), v_(v), index_topk_(index_topk),
      eps_(static_cast<float>(eps)), latent_eps_(static_cast<float>(latent_eps)), scale_(static_cast<float>(scale)),
      query_beta_(static_cast<float>(query_beta)), query_length_(query_length), interleave_(interleave),
      index_interleave_(index_interleave) {
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
  if (index_k_w.numel()) {
    TORCH_CHECK(q_rank_ > 0 && index_topk > 0, "mla_decode: the indexer needs q-LoRA and index_topk");
    index_dim_ = index_k_w.size(0);
    check_linear(index_k_w, index_dim_, d, index_norm_b, "indexer wk");
    check_linear(index_norm_w.view({-1, 1}), index_dim_, 1, at::Tensor(), "indexer norm");
    index_heads_ = index_weights_w.size(0);
    check_linear(index_weights_w, index_heads_, d, at::Tensor(), "indexer weights_proj");
    check_linear(index_q_w, index_heads_ * index_dim_, q_rank_, at::Tensor(), "indexer wq_b");
    TORCH_CHECK(index_dim_ >= rope && index_norm_b.numel() == index_dim_, "mla_decode: indexer shapes");
  }
}

void MlaDecode::check(const Caches& caches, int64_t pos) const {
  TORCH_CHECK(caches.size() == (index_dim_ ? 3u : 2u), "mla_decode: latents, rotary keys (and indexer keys) caches");
  const at::Tensor &latents = caches[0], &rope_keys = caches[1];
  check_fp32(latents, "latent cache"), check_fp32(rope_keys, "rope key cache");
  TORCH_CHECK(latents.dim() == 3 && latents.size(0) == 1 && latents.size(2) == latent_ && latents.is_contiguous() &&
                  rope_keys.dim() == 3 && rope_keys.size(0) == 1 && rope_keys.size(2) == rope_ &&
                  rope_keys.is_contiguous() && rope_keys.size(1) == latents.size(1),
              "mla_decode: caches [1, capacity, latent] and [1, capacity, rope]");
  TORCH_CHECK(0 <= pos && pos < latents.size(1), "mla_decode: no room in the cache");
  if (index_dim_) {
    check_fp32(caches[2], "indexer key cache");
    TORCH_CHECK(caches[2].dim() == 3 && caches[2].size(0) == 1 && caches[2].size(1) == latents.size(1) &&
                    caches[2].size(2) == index_dim_ && caches[2].is_contiguous(),
                "mla_decode: indexer key cache [1, capacity, Di]");
  }
}

at::Tensor MlaDecode::forward(at::Tensor x, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> caches,
                              int64_t pos, int64_t threads) const {
  check_fp32(x, "x");
  TORCH_CHECK(x.is_contiguous() && x.numel() == d, "mla_decode: x");
  check(caches, pos);
  TORCH_CHECK(cos.numel() == rope_ && sin.numel() == rope_ && cos.is_contiguous() && sin.is_contiguous(),
              "mla_decode: cos, sin [rope]");
  check_fp32(cos, "cos"), check_fp32(sin, "sin");
  at::Tensor y = at::empty_like(x);
  step(x.data_ptr<float>(), y.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), rope_, caches, pos,
       threads);
  return y;
}

void MlaDecode::step(const float* x, float* y, const float* cos, const float* sin, int64_t r, const Caches& caches,
                     int64_t pos, int64_t threads) const {
  TORCH_CHECK(r == rope_, "mla_decode: rotary width");
  const at::Tensor &latents = caches[0], &rope_keys = caches[1];
  const int64_t qk = nope_ + rope_;
  std::vector<float> h(d), q_low(q_rank_), q(heads_ * qk), kv(latent_ + rope_);
  rms_norm(x, norm_w_.data_ptr<float>(), h.data(), d, eps_);
  std::vector<Task> first = {{kv_a_w_.data_ptr<float>(), latent_ + rope_, h.data(), 0, 1, kv.data(), 0}};
  if (q_rank_) first.push_back({q_a_w_.data_ptr<float>(), q_rank_, h.data(), 0, 1, q_low.data(), 0});
  float* index_keys = index_dim_ ? caches[2].data_ptr<float>() : nullptr;
  if (index_dim_)  // the new token's indexer key, written at pos after its norm and rope
    first.push_back({index_k_w_.data_ptr<float>(), index_dim_, h.data(), 0, 1, index_keys + pos * index_dim_, 0});
  run_tasks(first, d, threads);  // the projections of the input in one pass
  if (index_dim_) {
    float* k = index_keys + pos * index_dim_;
    layer_norm(k, index_norm_w_.data_ptr<float>(), index_norm_b_.data_ptr<float>(), k, index_dim_, 1e-6f);
    rotate(k, cos, sin, rope_, index_interleave_);
  }
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

  std::vector<float> out(heads_ * v_);
  std::vector<int64_t> keys(pos + 1);
  if (index_dim_ && pos + 1 > index_topk_)
    keys = pick(h.data(), q_low.data(), index_keys, pos, cos, sin);
  else
    std::iota(keys.begin(), keys.end(), 0);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t hh = 0; hh < heads_; ++hh) attend_head(q.data() + hh * qk, hh, lc, rc, keys, pos, cos, sin, out.data());

  std::vector<float> projected(d);
  run_tasks({{o_w_.data_ptr<float>(), d, out.data(), 0, 1, projected.data(), 0}}, heads_ * v_, threads);
  const float* ob = data_or_null(o_b_);
  for (int64_t n = 0; n < d; ++n) y[n] = x[n] + (ob ? projected[n] + ob[n] : projected[n]);
}

std::vector<int64_t> MlaDecode::pick(const float* h, const float* q_low, const float* index_keys, int64_t pos,
                                     const float* cos, const float* sin) const {
  std::vector<float> q(index_heads_ * index_dim_), w(index_heads_);
  run_tasks({{index_q_w_.data_ptr<float>(), index_heads_ * index_dim_, q_low, 0, 1, q.data(), 0}}, q_rank_, 1);
  run_tasks({{index_weights_w_.data_ptr<float>(), index_heads_, h, 0, 1, w.data(), 0}}, d, 1);
  const float weight_scale = 1.f / std::sqrt(static_cast<float>(index_heads_ * index_dim_));
  for (int64_t g = 0; g < index_heads_; ++g) {
    rotate(q.data() + g * index_dim_, cos, sin, rope_, index_interleave_);
    w[g] *= weight_scale;
  }
  const int64_t n = pos + 1;
  std::vector<float> score(n, 0.f);
  for (int64_t s = 0; s < n; ++s)
    for (int64_t g = 0; g < index_heads_; ++g)
      score[s] += w[g] * std::max(0.f, dot(q.data() + g * index_dim_, index_keys + s * index_dim_, index_dim_));
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + index_topk_, order.end(), [&](int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  order.resize(index_topk_);
  std::sort(order.begin(), order.end());
  return order;
}

// Head hh's query (q_h: nope then rope part, rotated here) over the cached keys `keys`, into out's head hh.
void MlaDecode::attend_head(float* q_h, int64_t hh, const float* lc, const float* rc, const std::vector<int64_t>& keys,
                            int64_t pos, const float* cos, const float* sin, float* out) const {
  float factor = scale_;
  if (query_beta_ > 0)
    factor *= 1.f + query_beta_ * std::log1p(std::floor(static_cast<float>(pos) / static_cast<float>(query_length_)));
  rotate(q_h + nope_, cos, sin, rope_, interleave_);
  const float* k_rows = kv_b_w_.data_ptr<float>() + hh * (nope_ + v_) * latent_;  // K_h, then V_h
  const int64_t n_keys = keys.size();
  std::vector<float> q_lat(latent_, 0.f), o_lat(latent_, 0.f), s(n_keys);
  for (int64_t n = 0; n < nope_; ++n) axpy(q_h[n], k_rows + n * latent_, q_lat.data(), latent_);
  float top = -INFINITY;
  for (int64_t j = 0; j < n_keys; ++j) {
    const int64_t key = keys[j];
    s[j] = (dot(q_lat.data(), lc + key * latent_, latent_) + dot(q_h + nope_, rc + key * rope_, rope_)) * factor;
    top = std::max(top, s[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < n_keys; ++j) total += (s[j] = std::exp(s[j] - top));
  for (int64_t j = 0; j < n_keys; ++j) axpy(s[j] / total, lc + keys[j] * latent_, o_lat.data(), latent_);
  const float* v_rows = k_rows + nope_ * latent_;
  for (int64_t i = 0; i < v_; ++i) out[hh * v_ + i] = dot(v_rows + i * latent_, o_lat.data(), latent_);
}

// One token of each of B rows (a server's decode batch, each row its own sequence at its own position): every
// projection reads its weights once for all rows (segment_gemm.cpp's few-row product), the rest runs per row, the
// rows' heads in parallel. Caches [B, capacity, width] (row b's slot), positions [B] int64; cos, sin [B, rope].
at::Tensor MlaDecode::forward_rows(at::Tensor x, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> caches,
                                   at::Tensor positions, int64_t threads) const {
  check_fp32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d && x.is_contiguous(), "mla_decode: x rows");
  const int64_t b_len = x.size(0);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == b_len && positions.is_contiguous(),
              "mla_decode: one int64 position per row");
  TORCH_CHECK(caches.size() == (index_dim_ ? 3u : 2u), "mla_decode: latents, rotary keys (and indexer keys) caches");
  const int64_t widths[3] = {latent_, rope_, index_dim_};
  for (size_t i = 0; i < caches.size(); ++i) {
    check_fp32(caches[i], "cache");
    TORCH_CHECK(caches[i].dim() == 3 && caches[i].size(0) == b_len && caches[i].size(1) == caches[0].size(1) &&
                    caches[i].size(2) == widths[i] && caches[i].is_contiguous(),
                "mla_decode: caches [B, capacity, width]");
  }
  const int64_t capacity = caches[0].size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < b_len; ++b) TORCH_CHECK(0 <= pos[b] && pos[b] < capacity, "mla_decode: no room");
  check_fp32(cos, "cos"), check_fp32(sin, "sin");
  TORCH_CHECK(cos.numel() == b_len * rope_ && sin.numel() == cos.numel() && cos.is_contiguous() && sin.is_contiguous(),
              "mla_decode: cos, sin [B, rope]");

  const int64_t qk = nope_ + rope_, kv_w = latent_ + rope_, q_in = q_rank_ ? q_rank_ : d;
  std::vector<float> h(b_len * d), kv(b_len * kv_w), q_low(b_len * q_rank_), ik(b_len * index_dim_);
  std::vector<float> q(b_len * heads_ * qk), out(b_len * heads_ * v_), projected(b_len * d);
  const float* xp = x.data_ptr<float>();
  for (int64_t b = 0; b < b_len; ++b) rms_norm(xp + b * d, norm_w_.data_ptr<float>(), h.data() + b * d, d, eps_);
  std::vector<Product> first = {{kv_a_w_.data_ptr<float>(), kv_w, d, h.data(), d, b_len, kv.data(), kv_w}};
  if (q_rank_) first.push_back({q_a_w_.data_ptr<float>(), q_rank_, d, h.data(), d, b_len, q_low.data(), q_rank_});
  if (index_dim_)
    first.push_back({index_k_w_.data_ptr<float>(), index_dim_, d, h.data(), d, b_len, ik.data(), index_dim_});
  run_products(first, threads);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t b = 0; b < b_len; ++b) {  // each row's new cache entries, at its own position
    const float *c = cp + b * rope_, *s = sp + b * rope_;
    float* row_kv = kv.data() + b * kv_w;
    add_bias(row_kv, kv_a_b_);
    rms_norm(row_kv, kv_norm_w_.data_ptr<float>(), caches[0].data_ptr<float>() + (b * capacity + pos[b]) * latent_,
             latent_, latent_eps_);
    rotate(row_kv + latent_, c, s, rope_, interleave_);
    std::copy(row_kv + latent_, row_kv + kv_w, caches[1].data_ptr<float>() + (b * capacity + pos[b]) * rope_);
    if (q_rank_) {
      float* ql = q_low.data() + b * q_rank_;
      add_bias(ql, q_a_b_);
      rms_norm(ql, q_norm_w_.data_ptr<float>(), ql, q_rank_, latent_eps_);
    }
    if (index_dim_) {
      float* k = caches[2].data_ptr<float>() + (b * capacity + pos[b]) * index_dim_;
      layer_norm(ik.data() + b * index_dim_, index_norm_w_.data_ptr<float>(), index_norm_b_.data_ptr<float>(), k,
                 index_dim_, 1e-6f);
      rotate(k, c, s, rope_, index_interleave_);
    }
  }
  run_products({{q_b_w_.data_ptr<float>(), heads_ * qk, q_in, q_rank_ ? q_low.data() : h.data(), q_in, b_len,
                 q.data(), heads_ * qk}},
               threads);
  std::vector<std::vector<int64_t>> keys(b_len);
  for (int64_t b = 0; b < b_len; ++b) {
    if (index_dim_ && pos[b] + 1 > index_topk_) {
      keys[b] = pick(h.data() + b * d, q_low.data() + b * q_rank_,
                     caches[2].data_ptr<float>() + b * capacity * index_dim_, pos[b], cp + b * rope_, sp + b * rope_);
    } else {
      keys[b].resize(pos[b] + 1);
      std::iota(keys[b].begin(), keys[b].end(), 0);
    }
  }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t task = 0; task < b_len * heads_; ++task) {
    const int64_t b = task / heads_, hh = task % heads_;
    attend_head(q.data() + (b * heads_ + hh) * qk, hh, caches[0].data_ptr<float>() + b * capacity * latent_,
                caches[1].data_ptr<float>() + b * capacity * rope_, keys[b], pos[b], cp + b * rope_, sp + b * rope_,
                out.data() + b * heads_ * v_);
  }
  run_products({{o_w_.data_ptr<float>(), d, heads_ * v_, out.data(), heads_ * v_, b_len, projected.data(), d}},
               threads);
  return residual_rows(x, projected, o_b_);
}
