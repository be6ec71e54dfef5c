// A whole decoder step for one token in one call (see decode.h): the residual stream stays one row here from the
// embedding to the logits.
#include <cmath>

#include "decode.h"

void rope_angles(int64_t pos, const at::Tensor& inv_freq, double factor, std::vector<float>& cos,
                 std::vector<float>& sin) {
  const int64_t half = inv_freq.numel();
  if (half) check_fp32(inv_freq, "inv_freq");
  TORCH_CHECK(inv_freq.is_contiguous(), "decode chain: inv_freq");
  cos.resize(2 * half), sin.resize(2 * half);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq.data_ptr<float>()[i];
    cos[i] = cos[i + half] = std::cos(angle) * static_cast<float>(factor);
    sin[i] = sin[i + half] = std::sin(angle) * static_cast<float>(factor);
  }
}

int64_t chain_token(const at::Tensor& token, int64_t vocab) {
  TORCH_CHECK(token.numel() == 1 && token.scalar_type() == at::kLong, "decode chain: one int64 token");
  const int64_t id = *token.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(0 <= id && id < vocab, "input_ids hold ids outside the vocabulary: allowed [0, ", vocab - 1, "]");
  return id;
}

bool keeps_routes(const at::Tensor& routed, const std::vector<std::shared_ptr<FfnDecode>>& ffn) {
  if (routed.numel() == 0) return false;
  TORCH_CHECK(routed.scalar_type() == at::kLong && routed.dim() == 2 &&
                  routed.size(0) == static_cast<int64_t>(ffn.size()) && routed.is_contiguous(),
              "decode chain: routed must be int64 [layers, k]");
  for (const auto& f : ffn) TORCH_CHECK(f->top_k <= routed.size(1), "decode chain: routed width");
  return true;
}

OutputHead::OutputHead(at::Tensor w, at::Tensor b, std::shared_ptr<QuantWeights> q, int64_t d)
    : w_(w), b_(b), q_(q) {
  if (q_) {
    TORCH_CHECK(q_->experts == 1 && q_->cols == d, "decode chain: quantized output head");
    rows_ = q_->rows;
  } else {
    check_fp32(w, "output head");
    TORCH_CHECK(w.dim() == 2 && w.size(1) == d && w.is_contiguous(), "decode chain: output head");
    rows_ = w.size(0);
  }
  if (b.numel()) check_fp32(b, "head bias");
  TORCH_CHECK(b.numel() == 0 || (b.numel() == rows_ && b.is_contiguous()), "decode chain: head bias");
}

at::Tensor OutputHead::logits(const float* h, const at::TensorOptions& options, int64_t threads) const {
  at::Tensor logits = at::empty({1, 1, rows_}, options);
  float* out = logits.data_ptr<float>();
  if (q_)
    quant_row(*q_, h, out, threads);
  else
    run_tasks({{w_.data_ptr<float>(), rows_, h, 0, 1, out, 0}}, w_.size(1), threads);
  if (b_.numel()) {
    const float* b = b_.data_ptr<float>();
    for (int64_t n = 0; n < rows_; ++n) out[n] += b[n];
  }
  return logits;
}

DecodeChain::DecodeChain(at::Tensor embed_w, std::vector<std::shared_ptr<DecodeAttention>> attention,
                         std::vector<std::shared_ptr<FfnDecode>> ffn, std::vector<bool> rope_layers,
                         at::Tensor norm_w, double eps, at::Tensor head_w, at::Tensor head_b,
                         std::shared_ptr<QuantWeights> head_quant)
    : embed_w_(embed_w), norm_w_(norm_w), head_(head_w, head_b, head_quant, norm_w.numel()), attention_(attention),
      ffn_(ffn), rope_layers_(rope_layers), eps_(static_cast<float>(eps)) {
  check_fp32(embed_w, "embedding"), check_fp32(norm_w, "final norm");
  const int64_t d = norm_w.numel();
  TORCH_CHECK(embed_w.dim() == 2 && embed_w.size(1) == d && embed_w.is_contiguous() && norm_w.is_contiguous(),
              "decode_chain: embedding");
  TORCH_CHECK(attention.size() == ffn.size() && rope_layers.size() == ffn.size(), "decode_chain: layers");
  for (size_t i = 0; i < ffn.size(); ++i)
    TORCH_CHECK(attention[i] && ffn[i] && attention[i]->d == d && ffn[i]->d == d, "decode_chain: layer widths");
}

at::Tensor DecodeChain::step(at::Tensor token, int64_t pos, at::Tensor inv_freq, double rope_factor,
                             std::vector<std::vector<at::Tensor>> caches, at::Tensor routed,
                             int64_t threads) const {
  const int64_t d = norm_w_.numel(), layers = ffn_.size(), id = chain_token(token, embed_w_.size(0));
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == layers, "decode_chain: the caches of every layer");
  for (int64_t i = 0; i < layers; ++i) attention_[i]->check(caches[i], pos);
  const bool keep_routes = keeps_routes(routed, ffn_);

  std::vector<float> cos, sin;
  rope_angles(pos, inv_freq, rope_factor, cos, sin);
  const int64_t half = inv_freq.numel();

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
  return head_.logits(h.data(), embed_w_.options(), threads);
}
