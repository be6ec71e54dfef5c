// A whole decode step of a model with hyper-connected streams (DeepSeek-V4) in one call (see decode.h). Between
// the blocks nothing returns to Python: with the blocks' own steps alone, the connections' weights, the mixes and
// the calls between them (each some tens of microseconds with the caches cold from streaming weights) were a
// fifth of the step.
#include "decode.h"

HyperDecodeChain::HyperDecodeChain(at::Tensor embed_w, std::vector<std::shared_ptr<CompressedDecode>> attention,
                                   std::vector<std::shared_ptr<FfnDecode>> ffn, std::vector<at::Tensor> hyper,
                                   std::vector<at::Tensor> tables, std::vector<bool> sliding_rope,
                                   at::Tensor sliding_inv_freq, double sliding_factor, int64_t iters,
                                   double hyper_eps, double hyper_norm_eps, std::vector<at::Tensor> head_hyper,
                                   at::Tensor norm_w, double eps, at::Tensor head_w, at::Tensor head_b,
                                   std::shared_ptr<QuantWeights> head_quant)
    : embed_w_(embed_w), norm_w_(norm_w), sliding_inv_freq_(sliding_inv_freq),
      head_(head_w, head_b, head_quant, norm_w.numel()), attention_(attention), ffn_(ffn), hyper_(hyper),
      tables_(tables), head_hyper_(head_hyper), sliding_rope_(sliding_rope), iters_(iters),
      sliding_factor_(static_cast<float>(sliding_factor)), hyper_eps_(static_cast<float>(hyper_eps)),
      hyper_norm_eps_(static_cast<float>(hyper_norm_eps)), eps_(static_cast<float>(eps)) {
  check_fp32(embed_w, "embedding"), check_fp32(norm_w, "final norm");
  const int64_t d = norm_w.numel(), layers = attention.size();
  TORCH_CHECK(embed_w.dim() == 2 && embed_w.size(1) == d && embed_w.is_contiguous() && norm_w.is_contiguous(),
              "hyper_decode_chain: embedding");
  TORCH_CHECK(static_cast<int64_t>(ffn.size()) == layers && static_cast<int64_t>(tables.size()) == layers &&
                  static_cast<int64_t>(sliding_rope.size()) == layers &&
                  static_cast<int64_t>(hyper.size()) == 6 * layers && head_hyper.size() == 3 && iters >= 1,
              "hyper_decode_chain: per layer an attention and an FFN step, a table, a rope kind, six hyper tensors");
  TORCH_CHECK(head_hyper[0].dim() == 2 && head_hyper[0].size(1) % d == 0, "hyper_decode_chain: head connection");
  streams_ = head_hyper[0].size(1) / d;
  const int64_t n = streams_;
  for (const at::Tensor& t : head_hyper) check_fp32(t, "head connection");
  TORCH_CHECK(head_hyper[0].size(0) == n && head_hyper[1].numel() == n && head_hyper[2].numel() == 1,
              "hyper_decode_chain: head connection [n, n D], [n], [1]");
  for (int64_t i = 0; i < layers; ++i) {
    TORCH_CHECK(attention[i] && ffn[i] && attention[i]->d == d && ffn[i]->d == d, "hyper_decode_chain: widths");
    for (int64_t j = 0; j < 2; ++j) {
      const at::Tensor &fn = hyper[6 * i + 3 * j], &base = hyper[6 * i + 3 * j + 1], &scale = hyper[6 * i + 3 * j + 2];
      for (const at::Tensor* t : {&fn, &base, &scale}) check_fp32(*t, "hyper connection");
      TORCH_CHECK(fn.dim() == 2 && fn.size(0) == (2 + n) * n && fn.size(1) == n * d && fn.is_contiguous() &&
                      base.numel() == (2 + n) * n && scale.numel() == 3,
                  "hyper_decode_chain: connection fn [(2 + n) n, n D], base [(2 + n) n], scale [3]");
    }
    const at::Tensor& table = tables[i];
    TORCH_CHECK(table.numel() == 0 || (table.scalar_type() == at::kLong && table.dim() == 2 &&
                                       table.size(0) >= embed_w.size(0) && table.size(1) == ffn[i]->top_k &&
                                       table.is_contiguous()),
                "hyper_decode_chain: token table int64 [vocab, k]");
  }
}

at::Tensor HyperDecodeChain::step(at::Tensor token, int64_t pos, at::Tensor inv_freq, double rope_factor,
                                  std::vector<std::vector<at::Tensor>> caches, at::Tensor routed,
                                  int64_t threads) const {
  const int64_t d = norm_w_.numel(), n = streams_, layers = ffn_.size(), id = chain_token(token, embed_w_.size(0));
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == layers, "hyper_decode_chain: the caches of every layer");
  for (int64_t i = 0; i < layers; ++i) attention_[i]->check(caches[i], pos);
  const bool keep_routes = keeps_routes(routed, ffn_);
  check_fp32(inv_freq, "inv_freq");
  std::vector<float> cos, sin, sliding_cos, sliding_sin;
  rope_angles(pos, inv_freq, rope_factor, cos, sin);
  rope_angles(pos, sliding_inv_freq_, sliding_factor_, sliding_cos, sliding_sin);

  std::vector<float> x(n * d), mixed(n * d), post(n), comb(n * n), collapsed(d), out(d);
  const float* row = embed_w_.data_ptr<float>() + id * d;
  for (int64_t j = 0; j < n; ++j) std::copy(row, row + d, x.data() + j * d);
  std::vector<int64_t> ids;
  // one connection around a block: its weights and collapse, the block (collapsed -> out), the mix
  const auto around = [&](const at::Tensor* hc, const auto& block) {
    hyper_token(x.data(), hc[0].data_ptr<float>(), hc[1].data_ptr<float>(), hc[2].data_ptr<float>(), n, d, iters_,
                hyper_eps_, hyper_norm_eps_, post.data(), comb.data(), collapsed.data(), threads);
    block();
    hyper_mix_token(x.data(), out.data(), post.data(), comb.data(), n, d, mixed.data());
    x.swap(mixed);
  };
  for (int64_t i = 0; i < layers; ++i) {
    const bool sliding = sliding_rope_[i];
    const std::vector<float>&c = sliding ? sliding_cos : cos, &s = sliding ? sliding_sin : sin;
    around(&hyper_[6 * i], [&] {
      attention_[i]->step(collapsed.data(), out.data(), c.data(), s.data(), c.size(), inv_freq.data_ptr<float>(),
                          static_cast<float>(rope_factor), caches[i], pos, threads);
    });
    const int64_t* fixed = tables_[i].numel() ? tables_[i].data_ptr<int64_t>() + id * ffn_[i]->top_k : nullptr;
    ids.resize(ffn_[i]->top_k);
    around(&hyper_[6 * i + 3], [&] { ffn_[i]->run(collapsed.data(), out.data(), ids.data(), threads, fixed); });
    if (keep_routes) std::copy(ids.begin(), ids.end(), routed.data_ptr<int64_t>() + i * routed.size(1));
  }

  hyper_head_token(x.data(), head_hyper_[0].data_ptr<float>(), head_hyper_[1].data_ptr<float>(),
                   *head_hyper_[2].data_ptr<float>(), n, d, hyper_eps_, hyper_norm_eps_, collapsed.data(), threads);
  rms_norm(collapsed.data(), norm_w_.data_ptr<float>(), out.data(), d, eps_);
  return head_.logits(out.data(), embed_w_.options(), threads);
}
