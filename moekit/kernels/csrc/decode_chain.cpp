// A whole decoder step for one token in one call (see decode.h): the residual stream stays one row here from the
// embedding to the logits.
#include <cmath>

#include "decode.h"

DecodeChain::DecodeChain(at::Tensor embed_w, std::vector<std::shared_ptr<DecodeAttention>> attention,
                         std::vector<std::shared_ptr<FfnDecode>> ffn, std::vector<bool> rope_layers,
                         at::Tensor norm_w, double eps, at::Tensor head_w, at::Tensor head_b,
                         std::shared_ptr<QuantWeights> head_quant)
    : embed_w_(embed_w), norm_w_(norm_w), head_w_(head_w), head_b_(head_b), head_q_(head_quant),
      attention_(attention), ffn_(ffn), rope_layers_(rope_layers), eps_(static_cast<float>(eps)) {
  check_fp32(embed_w, "embedding"), check_fp32(norm_w, "final norm");
  const int64_t d = norm_w.numel();
  TORCH_CHECK(embed_w.dim() == 2 && embed_w.size(1) == d && embed_w.is_contiguous() && norm_w.is_contiguous(),
              "decode_chain: embedding");
  if (head_q_) {
    TORCH_CHECK(head_q_->experts == 1 && head_q_->cols == d, "decode_chain: quantized output head");
    head_rows_ = head_q_->rows;
  } else {
    check_fp32(head_w, "output head");
    TORCH_CHECK(head_w.dim() == 2 && head_w.size(1) == d && head_w.is_contiguous(), "decode_chain: output head");
    head_rows_ = head_w.size(0);
  }
  if (head_b.numel()) check_fp32(head_b, "head bias");
  TORCH_CHECK(head_b.numel() == 0 || (head_b.numel() == head_rows_ && head_b.is_contiguous()),
              "decode_chain: head bias");
  TORCH_CHECK(attention.size() == ffn.size() && rope_layers.size() == ffn.size(), "decode_chain: layers");
  for (size_t i = 0; i < ffn.size(); ++i)
    TORCH_CHECK(attention[i] && ffn[i] && attention[i]->d == d && ffn[i]->d == d, "decode_chain: layer widths");
}

at::Tensor DecodeChain::step(at::Tensor token, int64_t pos, at::Tensor inv_freq, double rope_factor,
                             std::vector<std::vector<at::Tensor>> caches, at::Tensor routed,
                             int64_t threads) const {
  const int64_t d = norm_w_.numel(), vocab = embed_w_.size(0), layers = ffn_.size();
  TORCH_CHECK(token.numel() == 1 && token.scalar_type() == at::kLong, "decode_chain: one int64 token");
  const int64_t id = *token.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(0 <= id && id < vocab, "input_ids hold ids outside the vocabulary: allowed [0, ", vocab - 1, "]");
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == layers, "decode_chain: the caches of every layer");
  for (int64_t i = 0; i < layers; ++i) attention_[i]->check(caches[i], pos);
  const bool keep_routes = routed.numel() > 0;
  if (keep_routes) {
    TORCH_CHECK(routed.scalar_type() == at::kLong && routed.dim() == 2 && routed.size(0) == layers &&
                    routed.is_contiguous(),
                "decode_chain: routed must be int64 [layers, k]");
    for (int64_t i = 0; i < layers; ++i) TORCH_CHECK(ffn_[i]->top_k <= routed.size(1), "decode_chain: routed width");
  }

  // rotary angles of this position, each frequency twice as RotaryEmbedding lays them out: [f0..fn-1, f0..fn-1]
  const int64_t half = inv_freq.numel();
  if (half) check_fp32(inv_freq, "inv_freq");
  std::vector<float> cos(2 * half), sin(2 * half);
  const float factor = static_cast<float>(rope_factor);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq.data_ptr<float>()[i];
    cos[i] = cos[i + half] = std::cos(angle) * factor;
    sin[i] = sin[i + half] = std::sin(angle) * factor;
  }

  std::vector<float> x(embed_w_.data_ptr<float>() + id * d, embed_w_.data_ptr<float>() + (id + 1) * d);
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < layers; ++i) {
    const DecodeAttention& attention = *attention_[i];
    const int64_t r = rope_layers_[i] ? 2 * half : 0;
    TORCH_CHECK(r <= attention.rope_width(), "decode_chain: rotary width");
    attention.step(x.data(), x.data(), cos.data(), sin.data(), r, caches[i], pos, threads);
    ids.resize(ffn_[i]->top_k);
    ffn_[i]->run(x.data(), x.data(), ids.data(), threads);
    if (keep_routes) std::copy(ids.begin(), ids.end(), routed.data_ptr<int64_t>() + i * routed.size(1));
  }

  std::vector<float> h(d);
  rms_norm(x.data(), norm_w_.data_ptr<float>(), h.data(), d, eps_);
  at::Tensor logits = at::empty({1, 1, head_rows_}, embed_w_.options());
  float* out = logits.data_ptr<float>();
  if (head_q_)
    quant_row(*head_q_, h.data(), out, threads);
  else
    run_tasks({{head_w_.data_ptr<float>(), head_rows_, h.data(), 0, 1, out, 0}}, d, threads);
  if (head_b_.numel()) {
    const float* b = head_b_.data_ptr<float>();
    for (int64_t n = 0; n < head_rows_; ++n) out[n] += b[n];
  }
  return logits;
}
