// One decode step of a grouped-query attention block at batch 1, in one call: RMSNorm, the q/k/v projections in one
// pass over their weights, QK-norm, rotary embedding, the new key and value written into the cache, attention of
// the one query over the cached keys, the output projection and the residual add. In eager PyTorch the same step
// takes some 60 small operators whose fixed costs (a few microseconds each, more with caches cold from streaming
// weights) add up to more than the step's own memory traffic on small models.
#include <cmath>

#include "decode.h"

// RMSNorm of `width`-wide groups of x in place; the weight covers one group (per-head norm) or all of x (full).
static void group_norm(float* x, int64_t total, const at::Tensor& w, float eps) {
  const int64_t width = w.numel();
  if (width == 0) return;
  TORCH_CHECK(total % width == 0, "attention_decode: QK-norm weight does not divide the projection");
  for (int64_t g = 0; g < total; g += width) rms_norm(x + g, w.data_ptr<float>(), x + g, width, eps);
}

// Split-half rotary embedding of the first r dims of each head (the rest pass through): cos and sin [r] hold
// each frequency twice, as RotaryEmbedding returns them.
static void rope(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin, int64_t r) {
  const int64_t half = r / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// An optional input: empty, or fp32, contiguous and numel long.
static void check_optional(const at::Tensor& t, int64_t numel, const char* what) {
  if (t.numel() == 0) return;
  check_fp32(t, what);
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, "attention_decode: ", what, " shape");
}

// qkv_w: q [Hq*hd, D], k and v [Hkv*hd, D]; qkv_b and o_b: biases or empty tensors; q_norm_w, k_norm_w: [hd]
// (per head) or, with full_qk_norm, the whole projection's width, or empty; clip > 0 clamps q, k and v to
// [-clip, clip] (OLMoE's clip_qkv: after a full-width norm, before a per-head one); window > 0 limits attention to
// the last `window` keys (the query's own included); sinks [Hq] (GPT-OSS) or empty: one more logit per head in the
// softmax's denominator, with no value.
AttentionDecode::AttentionDecode(at::Tensor norm_w, double eps, std::vector<at::Tensor> qkv_w,
                                 std::vector<at::Tensor> qkv_b, int64_t head_dim, at::Tensor q_norm_w,
                                 at::Tensor k_norm_w, bool full_qk_norm, double qk_eps, double clip, int64_t window,
                                 double scale, at::Tensor sinks, at::Tensor o_w, at::Tensor o_b,
                                 std::vector<std::shared_ptr<QuantWeights>> qkv_quant,
                                 std::shared_ptr<QuantWeights> o_quant)
    : head_dim(head_dim), norm_w_(norm_w), q_norm_w_(q_norm_w), k_norm_w_(k_norm_w), sinks_(sinks), o_w_(o_w),
      o_b_(o_b), qkv_w_(qkv_w), qkv_b_(qkv_b), qkv_q_(qkv_quant), o_q_(o_quant), eps_(static_cast<float>(eps)), qk_eps_(static_cast<float>(qk_eps)),
      clip_(static_cast<float>(clip)), scale_(static_cast<float>(scale)), full_qk_norm_(full_qk_norm),
      window_(window) {
  check_fp32(norm_w, "norm weight");
  TORCH_CHECK(qkv_w.size() == 3 && qkv_b.size() == 3, "attention_decode: q, k and v weights and biases");
  if (qkv_q_.empty()) qkv_q_.resize(3);
  TORCH_CHECK(qkv_q_.size() == 3, "attention_decode: q, k and v quantized weights (or none)");
  d = norm_w.numel();
  TORCH_CHECK(norm_w.is_contiguous(), "attention_decode: norm");
  for (int i = 0; i < 3; ++i) {
    if (qkv_q_[i]) {
      TORCH_CHECK(qkv_q_[i]->experts == 1 && qkv_q_[i]->cols == d, "attention_decode: quantized qkv");
      rows_[i] = qkv_q_[i]->rows;
    } else {
      check_fp32(qkv_w[i], "projection weight");
      TORCH_CHECK(qkv_w[i].is_contiguous() && qkv_w[i].dim() == 2 && qkv_w[i].size(1) == d, "attention_decode: qkv");
      rows_[i] = qkv_w[i].size(0);
    }
    check_optional(qkv_b[i], rows_[i], "projection bias");
  }
  TORCH_CHECK(head_dim > 0 && rows_[0] % head_dim == 0 && rows_[1] % head_dim == 0 && rows_[2] == rows_[1],
              "attention_decode: projection widths");
  heads = rows_[0] / head_dim, kv_heads = rows_[1] / head_dim;
  TORCH_CHECK(heads % kv_heads == 0, "attention_decode: heads per key-value head");
  if (o_q_) {
    TORCH_CHECK(o_q_->experts == 1 && o_q_->rows == d && o_q_->cols == rows_[0], "attention_decode: quantized o_proj");
  } else {
    check_fp32(o_w, "o_proj weight");
    TORCH_CHECK(o_w.is_contiguous() && o_w.dim() == 2 && o_w.size(0) == d && o_w.size(1) == rows_[0],
                "attention_decode: o_proj");
  }
  check_optional(o_b, d, "o_proj bias");
  check_optional(sinks, heads, "sinks");
  check_optional(q_norm_w, full_qk_norm ? rows_[0] : head_dim, "q norm weight");
  check_optional(k_norm_w, full_qk_norm ? rows_[1] : head_dim, "k norm weight");
}

void AttentionDecode::check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos) const {
  check_fp32(k_cache, "key cache"), check_fp32(v_cache, "value cache");
  TORCH_CHECK((k_cache.dim() == 3 || (k_cache.dim() == 4 && k_cache.size(0) == 1)) && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() && k_cache.size(-3) == kv_heads &&
                  k_cache.size(-1) == head_dim,
              "attention_decode: caches");
  TORCH_CHECK(0 <= pos && pos < k_cache.size(-2), "attention_decode: no room in the cache");
}

at::Tensor AttentionDecode::forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                                    at::Tensor v_cache, int64_t pos, int64_t threads) const {
  check_fp32(x, "x");
  TORCH_CHECK(x.is_contiguous() && x.numel() == d, "attention_decode: x");
  check_caches(k_cache, v_cache, pos);
  const int64_t r = cos.numel();
  TORCH_CHECK(r % 2 == 0 && r <= head_dim && sin.numel() == r, "attention_decode: rotary width");
  if (r) check_fp32(cos, "cos"), check_fp32(sin, "sin");
  TORCH_CHECK(!r || (cos.is_contiguous() && sin.is_contiguous()), "attention_decode: cos, sin");
  at::Tensor y = at::empty_like(x);
  run(x.data_ptr<float>(), y.data_ptr<float>(), r ? cos.data_ptr<float>() : nullptr,
      r ? sin.data_ptr<float>() : nullptr, r, k_cache, v_cache, pos, threads);
  return y;
}

void AttentionDecode::run(const float* x, float* y, const float* cos, const float* sin, int64_t r,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos, int64_t threads) const {
  const int64_t capacity = k_cache.size(-2);

  // norm, then q, k and v in one pass over their weights
  std::vector<float> h(d), qkv(qkv_width());
  rms_norm(x, norm_w_.data_ptr<float>(), h.data(), d, eps_);
  float* out[3] = {qkv.data(), qkv.data() + rows_[0], qkv.data() + rows_[0] + rows_[1]};
  std::vector<Task> tasks;
  for (int i = 0; i < 3; ++i)
    if (!qkv_q_[i]) tasks.push_back({qkv_w_[i].data_ptr<float>(), rows_[i], h.data(), 0, 1, out[i], 0});
  if (!tasks.empty()) run_tasks(tasks, d, threads);
  for (int i = 0; i < 3; ++i)
    if (qkv_q_[i]) quant_row(*qkv_q_[i], h.data(), out[i], threads);
  std::vector<float> attn(rows_[0]);
  attend_row(qkv.data(), cos, sin, r, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), capacity, pos,
             attn.data(), threads);

  // output projection and residual (into a row of its own: y may be x)
  std::vector<float> projected(d);
  if (o_q_)
    quant_row(*o_q_, attn.data(), projected.data(), threads);
  else
    run_tasks({{o_w_.data_ptr<float>(), d, attn.data(), 0, 1, projected.data(), 0}}, rows_[0], threads);
  const float* ob = data_or_null(o_b_);
  for (int64_t n = 0; n < d; ++n) y[n] = x[n] + (ob ? projected[n] + ob[n] : projected[n]);
}

// After the projections, for one row: biases, QK-norm, clip, rotary embedding, the new key and value written at pos
// of this row's caches ([Hkv, capacity, hd] at kc, vc), and the row's query of each head over keys [start, pos].
void AttentionDecode::attend_row(float* qkv, const float* cos, const float* sin, int64_t r, float* kc, float* vc,
                                 int64_t capacity, int64_t pos, float* attn, int64_t threads) const {
  float* out[3] = {qkv, qkv + rows_[0], qkv + rows_[0] + rows_[1]};
  for (int i = 0; i < 3; ++i) {
    if (qkv_b_[i].numel() == 0) continue;
    const float* b = qkv_b_[i].data_ptr<float>();
    for (int64_t n = 0; n < rows_[i]; ++n) out[i][n] += b[n];
  }
  if (full_qk_norm_) group_norm(out[0], rows_[0], q_norm_w_, qk_eps_), group_norm(out[1], rows_[1], k_norm_w_, qk_eps_);
  if (clip_ > 0)
    for (int64_t i = 0; i < qkv_width(); ++i) qkv[i] = std::min(std::max(qkv[i], -clip_), clip_);
  if (!full_qk_norm_) group_norm(out[0], rows_[0], q_norm_w_, qk_eps_), group_norm(out[1], rows_[1], k_norm_w_, qk_eps_);
  if (r) {
    rope(out[0], heads, head_dim, cos, sin, r);
    rope(out[1], kv_heads, head_dim, cos, sin, r);
  }
  for (int64_t g = 0; g < kv_heads; ++g) {
    std::copy(out[1] + g * head_dim, out[1] + (g + 1) * head_dim, kc + (g * capacity + pos) * head_dim);
    std::copy(out[2] + g * head_dim, out[2] + (g + 1) * head_dim, vc + (g * capacity + pos) * head_dim);
  }
  if (!attn) return;
  const int64_t n_keys = pos + 1 - window_start(pos);
#pragma omp parallel for num_threads(threads) if (heads * n_keys * head_dim > (1 << 16))
  for (int64_t hh = 0; hh < heads; ++hh) attend_head(hh, out[0] + hh * head_dim, kc, vc, capacity, pos, attn);
}

// The query q of head hh over its key-value head's keys [window_start(pos), pos], into attn's head hh.
void AttentionDecode::attend_head(int64_t hh, const float* q, const float* kc, const float* vc, int64_t capacity,
                                  int64_t pos, float* attn) const {
  const int64_t start = window_start(pos), n_keys = pos + 1 - start, g = hh / (heads / kv_heads);
  const float* keys = kc + (g * capacity + start) * head_dim;
  const float* values = vc + (g * capacity + start) * head_dim;
  std::vector<float> s(n_keys);
  const float* sinks = data_or_null(sinks_);
  const float sink = sinks ? sinks[hh] : -INFINITY;
  float top = sink;
  for (int64_t j = 0; j < n_keys; ++j) {
    s[j] = dot(q, keys + j * head_dim, head_dim) * scale_;
    top = std::max(top, s[j]);
  }
  float total = sinks ? std::exp(sink - top) : 0.f;
  for (int64_t j = 0; j < n_keys; ++j) total += (s[j] = std::exp(s[j] - top));
  float* o = attn + hh * head_dim;
  std::fill(o, o + head_dim, 0.f);
  for (int64_t j = 0; j < n_keys; ++j) {
    const float p = s[j] / total;
    const float* v = values + j * head_dim;
    for (int64_t i = 0; i < head_dim; ++i) o[i] += p * v[i];
  }
}

// B rows, each its own sequence at its own position (a server's decode batch): the projections read each weight
// once for all rows (the few-row product of segment_gemm.cpp), the rest runs per row, the rows' heads in parallel.
at::Tensor AttentionDecode::forward_rows(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor k_rows,
                                         at::Tensor v_rows, at::Tensor positions, int64_t threads) const {
  TORCH_CHECK(!qkv_q_[0] && !qkv_q_[1] && !qkv_q_[2] && !o_q_, "attention_decode: rows take fp32 weights only");
  check_fp32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d && x.is_contiguous(), "attention_decode: x rows");
  const int64_t b_len = x.size(0), r = cos.numel() / std::max<int64_t>(b_len, 1);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == b_len && positions.is_contiguous(),
              "attention_decode: one int64 position per row");
  check_fp32(k_rows, "key cache"), check_fp32(v_rows, "value cache");
  TORCH_CHECK(k_rows.dim() == 4 && k_rows.size(0) == b_len && k_rows.is_contiguous() && v_rows.is_contiguous() &&
                  v_rows.sizes() == k_rows.sizes() && k_rows.size(1) == kv_heads && k_rows.size(3) == head_dim,
              "attention_decode: caches [B, Hkv, capacity, hd]");
  const int64_t capacity = k_rows.size(2);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < b_len; ++b) TORCH_CHECK(0 <= pos[b] && pos[b] < capacity, "attention_decode: no room");
  TORCH_CHECK(r % 2 == 0 && r <= head_dim && cos.numel() == b_len * r && sin.numel() == cos.numel(),
              "attention_decode: rotary width");
  if (r) check_fp32(cos, "cos"), check_fp32(sin, "sin");
  TORCH_CHECK(!r || (cos.is_contiguous() && sin.is_contiguous()), "attention_decode: cos, sin");

  const int64_t width = qkv_width();
  std::vector<float> h(b_len * d), qkv(b_len * width), attn(b_len * rows_[0]), projected(b_len * d);
  const float* xp = x.data_ptr<float>();
  for (int64_t b = 0; b < b_len; ++b) rms_norm(xp + b * d, norm_w_.data_ptr<float>(), h.data() + b * d, d, eps_);
  std::vector<Product> products;
  for (int64_t i = 0, offset = 0; i < 3; offset += rows_[i], ++i)
    products.push_back({qkv_w_[i].data_ptr<float>(), rows_[i], d, h.data(), d, b_len, qkv.data() + offset, width});
  run_products(products, threads);

  float* kc = k_rows.data_ptr<float>();
  float* vc = v_rows.data_ptr<float>();
  const int64_t row_cache = kv_heads * capacity * head_dim;
  const float* cp = r ? cos.data_ptr<float>() : nullptr;
  const float* sp = r ? sin.data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < b_len; ++b)  // all but the attention, which runs below over every row's heads at once
    attend_row(qkv.data() + b * width, cp ? cp + b * r : nullptr, sp ? sp + b * r : nullptr, r, kc + b * row_cache,
               vc + b * row_cache, capacity, pos[b], nullptr, threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t task = 0; task < b_len * heads; ++task) {
    const int64_t b = task / heads, hh = task % heads;
    attend_head(hh, qkv.data() + b * width + hh * head_dim, kc + b * row_cache, vc + b * row_cache, capacity, pos[b],
                attn.data() + b * rows_[0]);
  }
  run_products({{o_w_.data_ptr<float>(), d, rows_[0], attn.data(), rows_[0], b_len, projected.data(), d}}, threads);
  return residual_rows(x, projected, o_b_);
}
