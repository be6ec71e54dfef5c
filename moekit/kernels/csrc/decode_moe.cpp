// One decode step of a token-choice MoE block at batch 1, in one call: RMSNorm, the router, top-k routing, the k
// experts (and the shared expert) streamed in two passes over their weights, the weighted combine and the
// residual add. A dense FFN is the same step with no experts: its weights take the shared expert's place. In eager
// PyTorch the same step is some 50 small operators (routing math, the plan, activation, combine), each with its
// fixed cost; see decode_attention.cpp.
#include <cmath>
#include <numeric>

#include "activation.h"
#include "decode.h"

// Routing: logits = router_w @ h (+ router_b); softmax_after_topk: top-k on the logits, weights = softmax over the
// k; else scores = softmax, sigmoid or sqrt(softplus) (score_function 0, 1, 2) over all experts, top-k on scores + selection_bias, weights = the scores;
// then optionally / (sum + normalize_eps), times scaling. apply_to_input scales each expert's input instead of
// its output. n_group > 1: only experts of the topk_group best groups (scored by their best choice value, or with
// group_top2 the sum of their best two) may be chosen (DeepSeek's group-limited routing).
// Experts: up_w [E, X, D] (X = 2F gated, F otherwise), down_w [E, D, F]; transposed: up_w [E, D, X], down_w
// [E, F, D]; biases [E, X] and [E, D] or empty. No experts (a dense FFN): router_w, up_w and down_w empty.
// Shared expert (empty tensors where none): gate [Fs, D], up [Fs, D], down [D, Fs], its sigmoid gate [1, D].
// norm_w [D], or empty: no norm.
FfnDecode::FfnDecode(at::Tensor norm_w, double eps, bool residual, at::Tensor router_w, at::Tensor router_b,
                     at::Tensor selection_bias, int64_t score_function, bool softmax_after_topk, int64_t top_k,
                     bool normalize, double normalize_eps, double scaling, bool apply_to_input, at::Tensor up_w,
                     at::Tensor down_w, at::Tensor up_b, at::Tensor down_b, bool transposed, bool gated,
                     bool interleaved, int64_t activation, double alpha, double limit, at::Tensor shared_gate_w,
                     at::Tensor shared_up_w, at::Tensor shared_down_w, at::Tensor shared_sigmoid_w,
                     std::vector<std::shared_ptr<QuantWeights>> up_quant,
                     std::vector<std::shared_ptr<QuantWeights>> down_quant, at::Tensor expert_place,
                     std::vector<std::shared_ptr<QuantWeights>> shared_quant, int64_t n_group, int64_t topk_group,
                     bool group_top2)
    : d(norm_w.numel() ? norm_w.numel() : (router_w.numel() ? router_w.size(1) : shared_up_w.size(-1))),
      experts(router_w.numel() ? router_w.size(0) : 0), top_k(experts ? top_k : 0),
      norm_w_(norm_w), router_w_(router_w), router_b_(router_b), selection_bias_(selection_bias), up_w_(up_w),
      down_w_(down_w), up_b_(up_b), down_b_(down_b), shared_gate_w_(shared_gate_w), shared_up_w_(shared_up_w),
      shared_down_w_(shared_down_w), shared_sigmoid_w_(shared_sigmoid_w), up_q_(up_quant), down_q_(down_quant), shared_q_(shared_quant), eps_(static_cast<float>(eps)),
      normalize_eps_(static_cast<float>(normalize_eps)), scaling_(static_cast<float>(scaling)),
      alpha_(static_cast<float>(alpha)), limit_(static_cast<float>(limit)), residual_(residual),
      score_function_(score_function), softmax_after_topk_(softmax_after_topk), normalize_(normalize), apply_to_input_(apply_to_input),
      transposed_(transposed), gated_(gated), interleaved_(interleaved), group_top2_(group_top2),
      activation_(activation), n_group_(n_group), topk_group_(topk_group) {
  for (const at::Tensor* t : {&norm_w, &router_w, &router_b, &selection_bias, &up_w, &down_w, &up_b, &down_b,
                              &shared_gate_w, &shared_up_w, &shared_down_w, &shared_sigmoid_w})
    if (t->numel()) check_fp32(*t, "moe_decode input");
  TORCH_CHECK(norm_w.is_contiguous(), "moe_decode: norm");
  TORCH_CHECK(0 <= score_function && score_function <= kSqrtSoftplusScores, "moe_decode: score_function");
  if (shared_q_.empty()) shared_q_.resize(3);
  TORCH_CHECK(shared_q_.size() == 3, "moe_decode: shared gate, up and down quantized weights (or none)");
  const auto& [sgq, suq, sdq] = std::tie(shared_q_[0], shared_q_[1], shared_q_[2]);
  TORCH_CHECK(router_w.numel() || shared_up_w.numel() || suq, "moe_decode: neither experts nor a dense FFN");
  TORCH_CHECK(norm_w.numel() || router_w.numel() || !suq, "moe_decode: a quantized dense FFN needs its norm");
  x_rows_ = f_ = 0;
  TORCH_CHECK(up_q_.size() == down_q_.size(), "moe_decode: both expert projections quantized, or neither");
  if (experts && !up_q_.empty()) {  // quantized: output-major stacks [E, X, D] and [E, D, F], or one per format
    TORCH_CHECK(router_w.dim() == 2 && router_w.size(1) == d && router_w.is_contiguous(), "moe_decode: router");
    x_rows_ = up_q_[0]->rows, f_ = down_q_[0]->cols;
    int64_t held = 0;
    for (size_t g = 0; g < up_q_.size(); ++g) {
      const auto &up = up_q_[g], &down = down_q_[g];
      TORCH_CHECK(up && down && up->experts == down->experts && up->rows == x_rows_ && up->cols == d &&
                      down->rows == d && down->cols == f_,
                  "moe_decode: quantized expert weights");
      held += up->experts;
    }
    TORCH_CHECK(!transposed && held == experts && x_rows_ == (gated ? 2 * f_ : f_), "moe_decode: quantized experts");
    if (expert_place.numel()) {
      TORCH_CHECK(expert_place.scalar_type() == at::kLong && expert_place.numel() == 2 * experts &&
                      expert_place.is_contiguous(),
                  "moe_decode: expert_place [E, 2] int64");
      place_.assign(expert_place.data_ptr<int64_t>(), expert_place.data_ptr<int64_t>() + 2 * experts);
      for (int64_t e = 0; e < experts; ++e)
        TORCH_CHECK(0 <= place_[2 * e] && place_[2 * e] < static_cast<int64_t>(up_q_.size()) &&
                        0 <= place_[2 * e + 1] && place_[2 * e + 1] < up_q_[place_[2 * e]]->experts,
                    "moe_decode: expert_place out of range");
    } else {
      TORCH_CHECK(up_q_.size() == 1, "moe_decode: several expert stacks need expert_place");
    }
  } else if (experts) {
    TORCH_CHECK(router_w.dim() == 2 && router_w.size(1) == d && router_w.is_contiguous(), "moe_decode: router");
    TORCH_CHECK(up_w.dim() == 3 && down_w.dim() == 3, "moe_decode: expert weights");
    x_rows_ = up_w.size(transposed ? 2 : 1), f_ = down_w.size(transposed ? 1 : 2);
    TORCH_CHECK(up_w.size(0) == experts && up_w.size(transposed ? 1 : 2) == d && up_w.is_contiguous() &&
                    down_w.size(0) == experts && down_w.size(transposed ? 2 : 1) == d && down_w.is_contiguous() &&
                    x_rows_ == (gated ? 2 * f_ : f_),
                "moe_decode: expert weights");
    TORCH_CHECK(1 <= top_k && top_k <= experts, "moe_decode: top_k");
    TORCH_CHECK(n_group >= 1 && experts % n_group == 0 && 1 <= topk_group && topk_group <= n_group &&
                    top_k <= topk_group * (experts / n_group) && (!group_top2 || experts / n_group >= 2),
                "moe_decode: expert groups");
    TORCH_CHECK(router_b.numel() == 0 || router_b.numel() == experts, "moe_decode: router bias");
    TORCH_CHECK(selection_bias.numel() == 0 || selection_bias.numel() == experts, "moe_decode: selection bias");
    TORCH_CHECK(up_b.numel() == 0 || (up_b.numel() == experts * x_rows_ && down_b.numel() == experts * d),
                "moe_decode: expert biases");
  }
  // the shared expert (or dense FFN): each of gate, up, down fp32 or quantized
  fs_ = suq ? suq->rows : (shared_up_w.numel() ? shared_up_w.size(0) : 0);
  if (!fs_) return;
  const auto fits = [&](const std::shared_ptr<QuantWeights>& q, const at::Tensor& w, int64_t rows, int64_t cols) {
    if (q) return q->experts == 1 && q->rows == rows && q->cols == cols;
    return w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.is_contiguous();
  };
  TORCH_CHECK(fits(suq, shared_up_w, fs_, d) && fits(sdq, shared_down_w, d, fs_) &&
                  (gated ? fits(sgq, shared_gate_w, fs_, d) : (!sgq && shared_gate_w.numel() == 0)) &&
                  (shared_sigmoid_w.numel() == 0 || shared_sigmoid_w.numel() == d),
              "moe_decode: shared expert");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> FfnDecode::forward(at::Tensor x, int64_t threads) const {
  check_fp32(x, "moe_decode input");
  TORCH_CHECK(x.is_contiguous() && x.numel() == d, "moe_decode: x");
  at::Tensor y = at::empty_like(x), ids = at::empty({top_k}, at::kLong), counts = at::zeros({experts}, at::kLong);
  run(x.data_ptr<float>(), y.data_ptr<float>(), ids.data_ptr<int64_t>(), threads);
  for (int64_t j = 0; j < top_k; ++j) counts.data_ptr<int64_t>()[ids.data_ptr<int64_t>()[j]] = 1;
  return {y, ids, counts};
}

// The router's choice for the normed token h: ids [top_k] in selection order and their weights w [top_k].
void FfnDecode::route(const float* h, int64_t* id, float* w, const int64_t* fixed) const {
  std::vector<float> logits(experts);
  run_tasks({{router_w_.data_ptr<float>(), experts, h, 0, 1, logits.data(), 0}}, d, 1);
  add_router_bias(logits.data(), 1);
  choose(logits.data(), id, w, fixed);
}

// The router bias added to `tokens` rows of logits, which must come out finite (a NaN or inf input would route
// silently to arbitrary experts).
void FfnDecode::add_router_bias(float* logits, int64_t tokens) const {
  const float* rb = data_or_null(router_b_);
  float total = 0.f;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t e = 0; e < experts; ++e) total += (logits[t * experts + e] += rb ? rb[e] : 0.f);
  TORCH_CHECK_VALUE(std::isfinite(total), "router input contains NaN or inf: allowed finite values only");
}

// The top-k choice (or the fixed one) and weights from one token's router logits (bias included).
void FfnDecode::choose(const float* logits, int64_t* id, float* w, const int64_t* fixed) const {
  std::vector<float> scores(logits, logits + experts), choice(experts);
  if (score_function_ == kSigmoidScores) {
    for (float& s : scores) s = 1.f / (1.f + std::exp(-s));
  } else if (score_function_ == kSqrtSoftplusScores) {  // softplus as torch computes it (linear above 20)
    for (float& s : scores) s = std::sqrt(s > 20.f ? s : std::log1p(std::exp(s)));
  } else if (!softmax_after_topk_) {
    const float top = *std::max_element(scores.begin(), scores.end());
    float sum = 0.f;
    for (float& s : scores) sum += (s = std::exp(s - top));
    for (float& s : scores) s /= sum;
  }
  std::vector<int64_t> order;
  if (fixed) {
    order.assign(fixed, fixed + top_k);
  } else {
    const float* sb = data_or_null(selection_bias_);
    for (int64_t e = 0; e < experts; ++e) choice[e] = scores[e] + (sb ? sb[e] : 0.f);
    if (n_group_ > 1) limit_to_groups(choice.data());
    order.resize(experts);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int64_t a, int64_t b) {
      return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
    });
  }
  for (int64_t j = 0; j < top_k; ++j) id[j] = order[j], w[j] = scores[order[j]];
  if (softmax_after_topk_) {  // over the k selected logits
    const float top = *std::max_element(w, w + top_k);
    float sum = 0.f;
    for (int64_t j = 0; j < top_k; ++j) sum += (w[j] = std::exp(w[j] - top));
    for (int64_t j = 0; j < top_k; ++j) w[j] /= sum;
  }
  if (normalize_) {
    float sum = 0.f;
    for (int64_t j = 0; j < top_k; ++j) sum += w[j];
    for (int64_t j = 0; j < top_k; ++j) w[j] /= sum + normalize_eps_;
  }
  if (scaling_ != 1.f)
    for (int64_t j = 0; j < top_k; ++j) w[j] *= scaling_;
}

// -inf for every expert outside the topk_group best groups (ties: the lower group first).
void FfnDecode::limit_to_groups(float* choice) const {
  const int64_t per = experts / n_group_;
  std::vector<float> group_score(n_group_);
  for (int64_t g = 0; g < n_group_; ++g) {
    const float* c = choice + g * per;
    float first = -INFINITY, second = -INFINITY;
    for (int64_t e = 0; e < per; ++e) {
      if (c[e] > first) second = first, first = c[e];
      else if (c[e] > second) second = c[e];
    }
    group_score[g] = group_top2_ ? first + second : first;
  }
  std::vector<int64_t> groups(n_group_);
  std::iota(groups.begin(), groups.end(), 0);
  std::partial_sort(groups.begin(), groups.begin() + topk_group_, groups.end(), [&](int64_t a, int64_t b) {
    return group_score[a] > group_score[b] || (group_score[a] == group_score[b] && a < b);
  });
  std::vector<bool> keep(n_group_, false);
  for (int64_t j = 0; j < topk_group_; ++j) keep[groups[j]] = true;
  for (int64_t g = 0; g < n_group_; ++g)
    if (!keep[g]) std::fill(choice + g * per, choice + (g + 1) * per, -INFINITY);
}

void FfnDecode::expert_products(const std::vector<std::shared_ptr<QuantWeights>>& stacks, const int64_t* ids,
                                const float* const* xs, float* const* ys, int64_t k, int64_t threads) const {
  if (place_.empty()) {  // one stack: the ids are its slots
    stacks[0]->products(ids, xs, ys, k, threads);
    return;
  }
  std::vector<int64_t> slots;
  std::vector<const float*> in;
  std::vector<float*> out;
  for (size_t g = 0; g < stacks.size(); ++g) {  // each format's experts in one call, in selection order
    slots.clear(), in.clear(), out.clear();
    for (int64_t j = 0; j < k; ++j)
      if (place_[2 * ids[j]] == static_cast<int64_t>(g))
        slots.push_back(place_[2 * ids[j] + 1]), in.push_back(xs[j]), out.push_back(ys[j]);
    if (!slots.empty())
      stacks[g]->products(slots.data(), in.data(), out.data(), static_cast<int64_t>(slots.size()), threads);
  }
}

void FfnDecode::run(const float* x, float* y, int64_t* id, int64_t threads, const int64_t* fixed) const {
  const int64_t k = top_k, x_rows = x_rows_, f = f_, fs = fs_;
  std::vector<float> h(x, x + d), w(k);
  if (norm_w_.numel()) rms_norm(x, norm_w_.data_ptr<float>(), h.data(), d, eps_);
  if (k) route(h.data(), id, w.data(), fixed);

  // up pass: the k experts' gate/up rows (and the shared expert's) against the token
  std::vector<float> inputs(apply_to_input_ ? k * d : 0), up(k * x_rows + 2 * fs), act_k(k * f + fs);
  std::vector<Task> tasks;
  std::vector<Product> input_major;
  std::vector<const float*> q_in(k);
  std::vector<float*> q_out(k);
  for (int64_t j = 0; j < k; ++j) {
    const float* in = h.data();
    if (apply_to_input_) {
      for (int64_t i = 0; i < d; ++i) inputs[j * d + i] = h[i] * w[j];
      in = inputs.data() + j * d;
    }
    if (!up_q_.empty()) {
      q_in[j] = in, q_out[j] = up.data() + j * x_rows;
      continue;
    }
    const float* wj = up_w_.data_ptr<float>() + id[j] * x_rows * d;
    if (transposed_)
      input_major.push_back({wj, x_rows, d, in, d, 1, up.data() + j * x_rows, x_rows});
    else
      tasks.push_back({wj, x_rows, in, 0, 1, up.data() + j * x_rows, 0});
  }
  float* shared_up = up.data() + k * x_rows;
  if (fs) {  // a dense FFN: [gate, up] concatenated when gated
    if (gated_ && !shared_q_[0]) tasks.push_back({shared_gate_w_.data_ptr<float>(), fs, h.data(), 0, 1, shared_up, 0});
    if (!shared_q_[1])
      tasks.push_back({shared_up_w_.data_ptr<float>(), fs, h.data(), 0, 1, shared_up + (gated_ ? fs : 0), 0});
  }
  if (!input_major.empty()) run_input_major(input_major, threads);
  if (!tasks.empty()) run_tasks(tasks, d, threads);
  if (!up_q_.empty() && k) expert_products(up_q_, id, q_in.data(), q_out.data(), k, threads);
  if (fs && gated_ && shared_q_[0]) quant_row(*shared_q_[0], h.data(), shared_up, threads);
  if (fs && shared_q_[1]) quant_row(*shared_q_[1], h.data(), shared_up + (gated_ ? fs : 0), threads);
  const float* ub = data_or_null(up_b_);
  for (int64_t j = 0; j < k; ++j) {
    float* hj = up.data() + j * x_rows;
    if (ub)
      for (int64_t i = 0; i < x_rows; ++i) hj[i] += ub[id[j] * x_rows + i];
    activate(hj, act_k.data() + j * f, f, gated_, interleaved_, activation_, alpha_, limit_);
  }
  if (fs) activate(shared_up, act_k.data() + k * f, fs, gated_, false, activation_, alpha_, limit_);

  // down pass, then combine: x + (sum_j w_j * out_j + shared)
  std::vector<float> down(k * d + (fs ? d : 0));
  tasks.clear(), input_major.clear();
  for (int64_t j = 0; j < k; ++j) {
    if (!down_q_.empty()) {
      q_in[j] = act_k.data() + j * f, q_out[j] = down.data() + j * d;
      continue;
    }
    const float* wj = down_w_.data_ptr<float>() + id[j] * d * f;
    if (transposed_)
      input_major.push_back({wj, d, f, act_k.data() + j * f, f, 1, down.data() + j * d, d});
    else
      tasks.push_back({wj, d, act_k.data() + j * f, 0, 1, down.data() + j * d, 0});
  }
  if (!input_major.empty()) run_input_major(input_major, threads);
  if (!tasks.empty()) run_tasks(tasks, f, threads);
  if (!down_q_.empty() && k) expert_products(down_q_, id, q_in.data(), q_out.data(), k, threads);
  if (fs && shared_q_[2])
    quant_row(*shared_q_[2], act_k.data() + k * f, down.data() + k * d, threads);
  else if (fs)
    run_tasks({{shared_down_w_.data_ptr<float>(), d, act_k.data() + k * f, 0, 1, down.data() + k * d, 0}}, fs,
              threads);
  const float* db = data_or_null(down_b_);
  float shared_scale = 1.f;
  if (fs && shared_sigmoid_w_.numel())
    shared_scale = 1.f / (1.f + std::exp(-dot(shared_sigmoid_w_.data_ptr<float>(), h.data(), d)));
  for (int64_t i = 0; i < d; ++i) {
    float routed = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const float out = down[j * d + i] + (db ? db[id[j] * d + i] : 0.f);
      routed += apply_to_input_ ? out : w[j] * out;
    }
    y[i] = (residual_ ? x[i] : 0.f) + (fs ? routed + shared_scale * down[k * d + i] : routed);
  }
}
