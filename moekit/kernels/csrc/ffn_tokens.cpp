// The FFN block's step for a batch of T tokens in one call (inference): norm, router, routing, the tokens' rows
// sorted into one segment per expert, the experts' and the shared expert's products, activation, the weighted
// combine in each token's slot order and the residual. The same arithmetic as the one-token step (decode_moe.cpp)
// and as the block's modules; what it saves is their operators around the products (the router's softmax and
// top-k, the sort, the row gathers, the activation, the combine): at a few dozen tokens those cost a sixth of the
// block here, each waking the thread pool with the caches cold from streaming the experts' weights.
#include <numeric>

#include "activation.h"
#include "decode.h"

namespace {

// Row-major rows: the first at data, ld floats apart.
struct Rows {
  float* data;
  int64_t ld, count, width;

  at::Tensor tensor() const { return at::from_blob(data, {count, width}, {ld, 1}, at::kFloat); }
};

// A pass's products: each a moekit kernel product (up to g_tiled_rows rows, or g_input_major_rows with input-major
// weights: the weights read in place) or, longer, MKL's on one thread per piece (it packs the weights once for all
// the piece's rows).
struct Products {
  int64_t piece_rows;  // long segments are cut into pieces of about this many rows, so no thread idles
  std::vector<Product> tiled, input_major;
  std::vector<at::Tensor> a, b, out;

  // y = x @ w^T, w [n, k] contiguous at w_data; transposed: x @ w, w [k, n].
  void add(const float* w_data, int64_t n, int64_t k, bool transposed, Rows x, Rows y) {
    if (x.count == 0) return;
    if (x.count <= (transposed ? g_input_major_rows.load() : g_tiled_rows.load())) {
      (transposed ? input_major : tiled).push_back({w_data, n, k, x.data, x.ld, x.count, y.data, y.ld});
      return;
    }
    const auto w = at::from_blob(const_cast<float*>(w_data), transposed ? at::IntArrayRef{k, n} : at::IntArrayRef{n, k},
                                 at::kFloat);
    const int64_t pieces = (x.count + piece_rows - 1) / piece_rows, len = (x.count + pieces - 1) / pieces;
    for (int64_t r = 0; r < x.count; r += len) {
      a.push_back(x.tensor().narrow(0, r, std::min(len, x.count - r))), b.push_back(transposed ? w : w.t());
      out.push_back(y.tensor().narrow(0, r, std::min(len, x.count - r)));
    }
  }

  void run(int64_t threads) {
    if (!tiled.empty()) run_products(tiled, threads);
    if (!input_major.empty()) run_input_major(input_major, threads);
    if (!a.empty()) {  // the costliest first, as mm_tasks wants them
      std::vector<size_t> order(a.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](size_t i, size_t j) { return out[i].numel() > out[j].numel(); });
      std::vector<at::Tensor> a2, b2, out2;
      for (const size_t i : order) a2.push_back(a[i]), b2.push_back(b[i]), out2.push_back(out[i]);
      mm_tasks(a2, b2, out2, {}, threads);
    }
    tiled.clear(), input_major.clear(), a.clear(), b.clear(), out.clear();
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> FfnDecode::forward_tokens(at::Tensor x, int64_t threads) const {
  TORCH_CHECK(up_q_.empty() && !shared_q_[0] && !shared_q_[1] && !shared_q_[2], "moe_decode: the batch step takes fp32 weights only");
  check_fp32(x, "moe_decode input");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d && x.is_contiguous(), "ffn tokens: x");
  const int64_t t_len = x.size(0), k = top_k, s_len = t_len * k, x_rows = x_rows_, f = f_, fs = fs_;
  const float* xp = x.data_ptr<float>();
  at::Tensor h = x;
  if (norm_w_.numel()) {
    h = at::empty_like(x);
#pragma omp parallel for num_threads(threads) if (t_len >= 64)
    for (int64_t t = 0; t < t_len; ++t) rms_norm(xp + t * d, norm_w_.data_ptr<float>(), h.data_ptr<float>() + t * d, d, eps_);
  }
  const float* hp = h.data_ptr<float>();

  // routing: every token's choice, then one segment per expert holding its tokens' rows in token order
  at::Tensor ids = at::empty({t_len, k}, at::kLong), counts = at::zeros({experts}, at::kLong);
  std::vector<float> w(s_len);
  std::vector<int64_t> position(s_len), start(experts + 1, 0);
  int64_t* id = ids.data_ptr<int64_t>();
  if (k) {
    at::Tensor logits = at::mm(h, router_w_.t());
    float* lp = logits.data_ptr<float>();
    add_router_bias(lp, t_len);
#pragma omp parallel for num_threads(threads) if (t_len >= 64)
    for (int64_t t = 0; t < t_len; ++t) choose(lp + t * experts, id + t * k, w.data() + t * k);
    int64_t* cp = counts.data_ptr<int64_t>();
    for (int64_t a = 0; a < s_len; ++a) ++cp[id[a]];
    for (int64_t e = 0; e < experts; ++e) start[e + 1] = start[e] + cp[e];
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < s_len; ++a) position[a] = next[id[a]]++;
  }
  at::Tensor rows = at::empty({s_len, d}, x.options());  // each assignment's input row, sorted by expert
  float* rp = rows.data_ptr<float>();
#pragma omp parallel for num_threads(threads) if (s_len >= 64)
  for (int64_t a = 0; a < s_len; ++a) {
    const float* src = hp + (a / k) * d;
    float* dst = rp + position[a] * d;
    if (apply_to_input_)
      for (int64_t i = 0; i < d; ++i) dst[i] = src[i] * w[a];
    else
      std::copy(src, src + d, dst);
  }

  // up pass: each touched expert over its segment, the shared expert over all tokens
  // segment_mm.py's split: pieces of at least 64 rows, of about a thread's share of all rows
  Products products{std::max<int64_t>(64, (s_len + threads - 1) / std::max<int64_t>(threads, 1))};
  at::Tensor up = at::empty({s_len, x_rows}, x.options()), shared_up = at::empty({t_len, 2 * fs}, x.options());
  float* upp = up.data_ptr<float>();
  float* sup = shared_up.data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t m = start[e + 1] - start[e];
    products.add(up_w_.data_ptr<float>() + e * x_rows * d, x_rows, d, transposed_, {rp + start[e] * d, d, m, d},
                 {upp + start[e] * x_rows, x_rows, m, x_rows});
  }
  const Rows normed{const_cast<float*>(hp), d, t_len, d};
  if (fs) {  // [gate, up] side by side in each row, as activate reads them
    if (gated_) products.add(shared_gate_w_.data_ptr<float>(), fs, d, false, normed, {sup, 2 * fs, t_len, fs});
    products.add(shared_up_w_.data_ptr<float>(), fs, d, false, normed, {sup + (gated_ ? fs : 0), 2 * fs, t_len, fs});
  }
  products.run(threads);

  // activation (after the up bias), into the down pass's inputs
  at::Tensor act_rows = at::empty({s_len, f}, x.options()), shared_act = at::empty({t_len, fs}, x.options());
  const float* ub = data_or_null(up_b_);
  float* ap = act_rows.data_ptr<float>();
#pragma omp parallel for num_threads(threads) if (s_len >= 64)
  for (int64_t a = 0; a < s_len; ++a) {
    float* row = upp + position[a] * x_rows;
    if (ub)
      for (int64_t i = 0; i < x_rows; ++i) row[i] += ub[id[a] * x_rows + i];
    activate(row, ap + position[a] * f, f, gated_, interleaved_, activation_, alpha_, limit_);
  }
#pragma omp parallel for num_threads(threads) if (fs && t_len >= 64)
  for (int64_t t = 0; t < (fs ? t_len : 0); ++t)
    activate(sup + t * 2 * fs, shared_act.data_ptr<float>() + t * fs, fs, gated_, false, activation_, alpha_, limit_);

  // down pass
  at::Tensor down = at::empty({s_len, d}, x.options()), shared_down = at::empty({t_len, fs ? d : 0}, x.options());
  float* dp = down.data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t m = start[e + 1] - start[e];
    products.add(down_w_.data_ptr<float>() + e * d * f, d, f, transposed_, {ap + start[e] * f, f, m, f},
                 {dp + start[e] * d, d, m, d});
  }
  if (fs)
    products.add(shared_down_w_.data_ptr<float>(), d, fs, false, {shared_act.data_ptr<float>(), fs, t_len, fs},
                 {shared_down.data_ptr<float>(), d, t_len, d});
  products.run(threads);

  // combine in each token's slot order (deterministic), the shared expert, the residual
  at::Tensor y = at::empty_like(x);
  const float* db = data_or_null(down_b_);
  const float* sig = data_or_null(shared_sigmoid_w_);
#pragma omp parallel for num_threads(threads) if (t_len >= 64)
  for (int64_t t = 0; t < t_len; ++t) {
    float* yt = y.data_ptr<float>() + t * d;
    std::fill(yt, yt + d, 0.f);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t a = t * k + j;
      const float* out = dp + position[a] * d;
      const float* bias = db ? db + id[a] * d : nullptr;
      const float scale = apply_to_input_ ? 1.f : w[a];
      for (int64_t i = 0; i < d; ++i) yt[i] += scale * (out[i] + (bias ? bias[i] : 0.f));
    }
    if (fs) {
      const float scale = sig ? 1.f / (1.f + std::exp(-dot(sig, hp + t * d, d))) : 1.f;
      axpy(scale, shared_down.data_ptr<float>() + t * d, yt, d);
    }
    if (residual_)
      for (int64_t i = 0; i < d; ++i) yt[i] += xp[t * d + i];
  }
  return {y, ids, counts};
}

void set_row_limits(int64_t tiled_rows, int64_t input_major_rows) {
  TORCH_CHECK(tiled_rows >= 0 && tiled_rows <= kTiledRows && input_major_rows >= 0 &&
                  input_major_rows <= kInputMajorRows,
              "set_row_limits: at most ", kTiledRows, " and ", kInputMajorRows, " rows");
  g_tiled_rows = tiled_rows, g_input_major_rows = input_major_rows;
}
