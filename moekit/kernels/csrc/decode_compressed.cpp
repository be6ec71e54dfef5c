// One decode step of DeepSeek-V4's attention block at batch 1, in one call (moekit/layers/compressed.py is the
// reference): the input norm, every projection of the input in one pass and those of the low-rank query in a
// second, the new token's cache rows (its window key and its compressors' inputs), the compressed entry whose
// window the token completes (written at the token's slot, so a step computes at most one per compressor instead
// of every entry of the past), the indexer's pick of CSA entries, one K = V head over the window and the entries
// with sinks, the values' rotation undone and the grouped low-rank output projection. The modules run each of
// these as several small operators (some 150 per block); at one token their fixed costs were 4x the weights' reads.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "decode.h"

// Rotate the last r of n values in adjacent pairs kept in place by cos, sin [r / 2] (sign -1: the inverse).
static void rope_tail(float* x, int64_t n, const float* cos, const float* sin, int64_t r, float sign = 1.f) {
  float* t = x + n - r;
  for (int64_t i = 0; i < r / 2; ++i) {
    const float even = t[2 * i], odd = t[2 * i + 1], s = sign * sin[i];
    t[2 * i] = even * cos[i] - odd * s;
    t[2 * i + 1] = odd * cos[i] + even * s;
  }
}

static const float* weight_of(const at::Tensor& w, int64_t rows, int64_t cols, const char* what) {
  check_fp32(w, what);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.is_contiguous(), "compressed_decode: ",
              what, " [", rows, ", ", cols, "]");
  return w.data_ptr<float>();
}

CompressedDecode::Pool::Pool(const std::vector<at::Tensor>& parts, int64_t d, int64_t dim, int64_t rate, bool overlap)
    : dim(dim), width(overlap ? 2 * dim : dim), rate(rate), overlap(overlap), weights(parts) {
  TORCH_CHECK(parts.size() == 4 && rate > 0, "compressed_decode: a compressor is kv, gate, position bias, norm");
  kv_w = weight_of(parts[0], width, d, "compressor kv_proj");
  gate_w = weight_of(parts[1], width, d, "compressor gate_proj");
  bias = weight_of(parts[2], rate, width, "compressor position_bias");
  norm_w = weight_of(parts[3].view({-1, 1}), dim, 1, "compressor norm");
}

// The entry of window w [w * rate, (w + 1) * rate) from the cached projections (kv, gate [capacity, width]): per
// channel a softmax over its slots of gate + position bias weighs the kv values (overlapping: window w - 1's first
// dim channels, then window w's last ones), RMS-normed and rotated at the window's first position.
void CompressedDecode::Pool::entry(const float* kv, const float* gate, int64_t w, const float* inv_freq, float factor,
                                   int64_t r, float eps, float* out) const {
  const int64_t slots = overlap ? 2 * rate : rate;
  std::vector<float> g(slots), v(slots);
  for (int64_t c = 0; c < dim; ++c) {
    int64_t n = 0;
    if (overlap) {
      for (int64_t j = 0; j < rate; ++j, ++n) {
        const int64_t s = (w - 1) * rate + j;
        v[n] = w > 0 ? kv[s * width + c] : 0.f;
        g[n] = w > 0 ? gate[s * width + c] + bias[j * width + c] : -INFINITY;
      }
    }
    const int64_t own = overlap ? dim : 0;
    for (int64_t j = 0; j < rate; ++j, ++n) {
      const int64_t s = w * rate + j;
      v[n] = kv[s * width + own + c];
      g[n] = gate[s * width + own + c] + bias[j * width + own + c];
    }
    const float top = *std::max_element(g.begin(), g.end());
    float total = 0.f, sum = 0.f;
    for (int64_t j = 0; j < slots; ++j) total += (g[j] = std::exp(g[j] - top));
    for (int64_t j = 0; j < slots; ++j) sum += v[j] * (g[j] / total);
    out[c] = sum;
  }
  rms_norm(out, norm_w, out, dim, eps);
  std::vector<float> cos(r / 2), sin(r / 2);
  for (int64_t i = 0; i < r / 2; ++i) {
    const float angle = static_cast<float>(w * rate) * inv_freq[i];
    cos[i] = std::cos(angle) * factor;
    sin[i] = std::sin(angle) * factor;
  }
  rope_tail(out, dim, cos.data(), sin.data(), r);
}

CompressedDecode::CompressedDecode(at::Tensor norm_w, double eps, at::Tensor q_a_w, at::Tensor q_norm_w,
                                   at::Tensor q_b_w, at::Tensor kv_w, at::Tensor kv_norm_w, at::Tensor o_a_w,
                                   at::Tensor o_b_w, at::Tensor sinks, int64_t heads, int64_t head_dim, int64_t groups,
                                   double block_eps, int64_t window, double scale, std::vector<at::Tensor> compressor,
                                   int64_t rate, bool overlap, std::vector<at::Tensor> indexer, int64_t index_heads,
                                   int64_t index_dim, int64_t index_topk)
    : norm_w_(norm_w), q_a_w_(q_a_w), q_norm_w_(q_norm_w), q_b_w_(q_b_w), kv_w_(kv_w), kv_norm_w_(kv_norm_w),
      o_a_w_(o_a_w), o_b_w_(o_b_w), sinks_(sinks), heads_(heads), head_dim_(head_dim), groups_(groups),
      window_(window), index_heads_(index_heads), index_dim_(index_dim), index_topk_(index_topk),
      eps_(static_cast<float>(eps)), block_eps_(static_cast<float>(block_eps)), scale_(static_cast<float>(scale)) {
  check_fp32(norm_w, "norm weight");
  TORCH_CHECK(norm_w.is_contiguous() && heads > 0 && head_dim > 0 && groups > 0 && heads % groups == 0 &&
                  window > 0,
              "compressed_decode: shapes");
  d = norm_w.numel();
  q_rank_ = q_a_w.size(0);
  weight_of(q_a_w, q_rank_, d, "q_a_proj");
  weight_of(q_norm_w.view({-1, 1}), q_rank_, 1, "q norm");
  weight_of(q_b_w, heads * head_dim, q_rank_, "q_b_proj");
  weight_of(kv_w, head_dim, d, "kv_proj");
  weight_of(kv_norm_w.view({-1, 1}), head_dim, 1, "kv norm");
  o_rank_ = o_a_w.size(0) / groups;
  weight_of(o_a_w, groups * o_rank_, heads * head_dim / groups, "o_a_proj");
  weight_of(o_b_w, d, groups * o_rank_, "o_b_proj");
  weight_of(sinks.view({-1, 1}), heads, 1, "sinks");
  if (!compressor.empty()) pools_.emplace_back(compressor, d, head_dim, rate, overlap);
  if (!indexer.empty()) {
    TORCH_CHECK(indexer.size() == 6 && pools_.size() == 1 && overlap && index_topk > 0,
                "compressed_decode: an indexer (its compressor, q_b_proj, weights_proj) beside CSA's compressor");
    pools_.emplace_back(std::vector<at::Tensor>(indexer.begin(), indexer.begin() + 4), d, index_dim, rate, true);
    index_q_w_ = indexer[4], index_weights_w_ = indexer[5];
    weight_of(index_q_w_, index_heads * index_dim, q_rank_, "indexer q_b_proj");
    weight_of(index_weights_w_, index_heads, d, "indexer weights_proj");
  }
}

int64_t CompressedDecode::cache_count() const { return 1 + 3 * static_cast<int64_t>(pools_.size()); }

void CompressedDecode::check(const Caches& caches, int64_t pos) const {
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == cache_count(),
              "compressed_decode: the window keys, each compressor's kv and gate, then each one's entries");
  std::vector<int64_t> widths = {head_dim_};
  for (const Pool& p : pools_) widths.insert(widths.end(), {p.width, p.width});
  for (const Pool& p : pools_) widths.push_back(p.dim);
  for (size_t i = 0; i < caches.size(); ++i) {
    check_fp32(caches[i], "cache");
    TORCH_CHECK(caches[i].dim() == 3 && caches[i].size(0) == 1 && caches[i].size(1) == caches[0].size(1) &&
                    caches[i].size(2) == widths[i] && caches[i].is_contiguous(),
                "compressed_decode: caches [1, capacity, width]");
  }
  TORCH_CHECK(0 <= pos && pos < caches[0].size(1), "compressed_decode: no room in the cache");
}

at::Tensor CompressedDecode::forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor inv_freq, double factor,
                                     std::vector<at::Tensor> caches, int64_t pos, int64_t threads) const {
  check_fp32(x, "x"), check_fp32(cos, "cos"), check_fp32(sin, "sin"), check_fp32(inv_freq, "inv_freq");
  TORCH_CHECK(x.is_contiguous() && x.numel() == d, "compressed_decode: x [D]");
  const int64_t r = cos.numel();
  TORCH_CHECK(sin.numel() == r && cos.is_contiguous() && sin.is_contiguous() && inv_freq.numel() == r / 2 &&
                  inv_freq.is_contiguous(),
              "compressed_decode: cos, sin [r], inv_freq [r / 2]");
  check(caches, pos);
  at::Tensor y = at::empty_like(x);
  step(x.data_ptr<float>(), y.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), r,
       inv_freq.data_ptr<float>(), static_cast<float>(factor), caches, pos, threads);
  return y;
}

void CompressedDecode::step(const float* x, float* y, const float* cp, const float* sp, int64_t r,
                            const float* inv_freq, float factor, const Caches& caches, int64_t pos,
                            int64_t threads) const {
  TORCH_CHECK(r > 0 && r % 2 == 0 && r <= head_dim_ && (index_dim_ == 0 || r <= index_dim_),
              "compressed_decode: rotary width");
  const int64_t hd = head_dim_, n_pools = pools_.size();
  std::vector<float> h(d), q_low(q_rank_), q(heads_ * hd), iq(index_heads_ * index_dim_), iw(index_heads_);
  rms_norm(x, norm_w_.data_ptr<float>(), h.data(), d, eps_);

  // the projections of the input in one pass: the new token's cache rows are written where they belong
  float* keys = caches[0].data_ptr<float>();
  std::vector<Task> first = {{q_a_w_.data_ptr<float>(), q_rank_, h.data(), 0, 1, q_low.data(), 0},
                             {kv_w_.data_ptr<float>(), hd, h.data(), 0, 1, keys + pos * hd, 0}};
  for (int64_t i = 0; i < n_pools; ++i) {
    const Pool& p = pools_[i];
    first.push_back({p.kv_w, p.width, h.data(), 0, 1, caches[1 + 2 * i].data_ptr<float>() + pos * p.width, 0});
    first.push_back({p.gate_w, p.width, h.data(), 0, 1, caches[2 + 2 * i].data_ptr<float>() + pos * p.width, 0});
  }
  if (index_heads_) first.push_back({index_weights_w_.data_ptr<float>(), index_heads_, h.data(), 0, 1, iw.data(), 0});
  run_tasks(first, d, threads);
  rms_norm(q_low.data(), q_norm_w_.data_ptr<float>(), q_low.data(), q_rank_, block_eps_);
  std::vector<Task> second = {{q_b_w_.data_ptr<float>(), heads_ * hd, q_low.data(), 0, 1, q.data(), 0}};
  if (index_heads_)
    second.push_back({index_q_w_.data_ptr<float>(), index_heads_ * index_dim_, q_low.data(), 0, 1, iq.data(), 0});
  run_tasks(second, q_rank_, threads);
  float* key = keys + pos * hd;
  rms_norm(key, kv_norm_w_.data_ptr<float>(), key, hd, block_eps_);
  rope_tail(key, hd, cp, sp, r);

  // the entry this token completes, then the visible ones: entry w sits at the slot of its window's last token
  const int64_t rate = n_pools ? pools_[0].rate : 1, visible = n_pools ? (pos + 1) / rate : 0;
  for (int64_t i = 0; i < n_pools && (pos + 1) % rate == 0; ++i) {
    const Pool& p = pools_[i];
    float* out = caches[1 + 2 * n_pools + i].data_ptr<float>() + pos * p.dim;
    p.entry(caches[1 + 2 * i].data_ptr<float>(), caches[2 + 2 * i].data_ptr<float>(), visible - 1, inv_freq, factor,
            r, block_eps_, out);
  }
  std::vector<const float*> rows;  // the keys (= values) every head attends to
  for (int64_t s = std::max<int64_t>(0, pos + 1 - window_); s <= pos; ++s) rows.push_back(keys + s * hd);
  if (n_pools) {
    const float* entries = caches[1 + 2 * n_pools].data_ptr<float>();
    for (int64_t w : picked(iq.data(), iw.data(), caches, visible, cp, sp, r))
      rows.push_back(entries + ((w + 1) * rate - 1) * hd);
  }

  std::vector<float> out(heads_ * hd);
  const float* sink = sinks_.data_ptr<float>();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t hh = 0; hh < heads_; ++hh) {
    float* q_h = q.data() + hh * hd;
    rms_norm(q_h, nullptr, q_h, hd, block_eps_);  // no weight
    rope_tail(q_h, hd, cp, sp, r);
    const int64_t n = rows.size();
    std::vector<float> s(n);
    float top = sink[hh];
    for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j] = dot(q_h, rows[j], hd) * scale_);
    float total = std::exp(sink[hh] - top);
    for (int64_t j = 0; j < n; ++j) total += (s[j] = std::exp(s[j] - top));
    float* o = out.data() + hh * hd;
    std::fill(o, o + hd, 0.f);
    for (int64_t j = 0; j < n; ++j) axpy(s[j] / total, rows[j], o, hd);
    rope_tail(o, hd, cp, sp, r, -1.f);  // the values' rotation undone at the query's position
  }

  // the grouped output projection: group g's heads through its own block of o_a, then o_b
  const int64_t group_in = heads_ * hd / groups_;
  std::vector<float> mixed(groups_ * o_rank_);
  std::vector<Task> grouped;
  for (int64_t g = 0; g < groups_; ++g)
    grouped.push_back({o_a_w_.data_ptr<float>() + g * o_rank_ * group_in, o_rank_, out.data() + g * group_in, 0, 1,
                       mixed.data() + g * o_rank_, 0});
  run_tasks(grouped, group_in, threads);
  run_tasks({{o_b_w_.data_ptr<float>(), d, mixed.data(), 0, 1, y, 0}}, groups_ * o_rank_, threads);
}

// The entries the heads attend to among the `visible` ones: all of them (HCA; CSA while they fit in index_topk),
// else the indexer's index_topk of the best score sum_h w_h relu(q_h . k_w), ascending.
std::vector<int64_t> CompressedDecode::picked(float* iq, float* iw, const Caches& caches, int64_t visible,
                                              const float* cos, const float* sin, int64_t r) const {
  std::vector<int64_t> order(visible);
  std::iota(order.begin(), order.end(), 0);
  if (pools_.size() < 2 || visible <= index_topk_) return order;
  const int64_t rate = pools_[0].rate, dim = index_dim_;
  const float* index_entries = caches[1 + 2 * pools_.size() + 1].data_ptr<float>();
  const float weight_scale = static_cast<float>(std::pow(index_heads_, -0.5) * std::pow(dim, -0.5));
  for (int64_t g = 0; g < index_heads_; ++g) {
    rope_tail(iq + g * dim, dim, cos, sin, r);
    iw[g] *= weight_scale;
  }
  std::vector<float> score(visible, 0.f);
  for (int64_t w = 0; w < visible; ++w) {
    const float* k = index_entries + ((w + 1) * rate - 1) * dim;
    for (int64_t g = 0; g < index_heads_; ++g) score[w] += iw[g] * std::max(0.f, dot(iq + g * dim, k, dim));
  }
  std::partial_sort(order.begin(), order.begin() + index_topk_, order.end(), [&](int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  order.resize(index_topk_);
  std::sort(order.begin(), order.end());
  return order;
}
