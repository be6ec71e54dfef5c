// Decode at batch 1: one block's step as one call (AttentionDecode, FfnDecode), and a whole model's step as one
// call (DecodeChain). Each block keeps its weights and settings, checked once when it is built (moekit's Python
// side builds them once per model and keeps them), so a step only checks what changes: the token and the caches.
// Steps allocate nothing but their outputs, and several threads may run steps of the same blocks at once.
#pragma once
#include <memory>
#include <tuple>
#include <vector>

#include "kernels.h"

// x + projected (+ bias) for rows x [B, D] and projected [B * D]: the residual of a block's rows form.
inline at::Tensor residual_rows(const at::Tensor& x, const std::vector<float>& projected, const at::Tensor& bias) {
  at::Tensor y = at::empty_like(x);
  const int64_t rows = x.size(0), d = x.size(1);
  const float *xp = x.data_ptr<float>(), *bp = data_or_null(bias);
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t n = 0; n < d; ++n) yp[b * d + n] = xp[b * d + n] + projected[b * d + n] + (bp ? bp[n] : 0.f);
  return y;
}

// An attention block's decode step as DecodeChain runs it: x + attention(norm(x)) for one token, its new cache
// entries written at pos of its caches (keys and values; MLA: latents, rotary keys and DSA's indexer keys).
using Caches = std::vector<at::Tensor>;
class DecodeAttention {
 public:
  virtual ~DecodeAttention() = default;
  // y [D] = x + attention (y may be x); cos and sin hold r values (0: no rotary).
  virtual void step(const float* x, float* y, const float* cos, const float* sin, int64_t r, const Caches& caches,
                    int64_t pos, int64_t threads) const = 0;
  // The caches fit this block and have room at pos.
  virtual void check(const Caches& caches, int64_t pos) const = 0;
  // The widest rotary part it takes.
  virtual int64_t rope_width() const = 0;
  int64_t d = 0;
};

// x + o_proj(attention(norm(x))) for one token of a grouped-query attention block (decode_attention.cpp).
class AttentionDecode : public DecodeAttention {
 public:
  AttentionDecode(at::Tensor norm_w, double eps, std::vector<at::Tensor> qkv_w, std::vector<at::Tensor> qkv_b,
                  int64_t head_dim, at::Tensor q_norm_w, at::Tensor k_norm_w, bool full_qk_norm, double qk_eps, double clip,
                  int64_t window, double scale, at::Tensor sinks, at::Tensor o_w, at::Tensor o_b,
                  std::vector<std::shared_ptr<QuantWeights>> qkv_quant, std::shared_ptr<QuantWeights> o_quant);
  // x [D]; cos, sin [r <= head_dim] or empty; caches [Hkv, capacity, hd] (a leading batch axis of 1 allowed), the
  // new key and value going to index pos. Returns x + attention [D].
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache,
                     int64_t pos, int64_t threads) const;
  void run(const float* x, float* y, const float* cos, const float* sin, int64_t rope_dim, const at::Tensor& k_cache,
           const at::Tensor& v_cache, int64_t pos, int64_t threads) const;
  void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos) const;
  void step(const float* x, float* y, const float* cos, const float* sin, int64_t r, const Caches& caches, int64_t pos,
            int64_t threads) const override {
    run(x, y, cos, sin, r, caches[0], caches[1], pos, threads);
  }
  void check(const Caches& caches, int64_t pos) const override {
    TORCH_CHECK(caches.size() == 2, "attention_decode: a key and a value cache");
    check_caches(caches[0], caches[1], pos);
  }
  int64_t rope_width() const override { return head_dim; }
  // B independent rows (fp32 weights): x [B, D]; cos, sin [B, r] or empty; caches [B, Hkv, capacity, hd] (row b's
  // slot); positions [B] int64, where each row's new key and value go. Returns x + attention [B, D].
  at::Tensor forward_rows(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor k_rows, at::Tensor v_rows,
                          at::Tensor positions, int64_t threads) const;

  int64_t head_dim, heads, kv_heads;

 private:
  int64_t qkv_width() const { return rows_[0] + 2 * rows_[1]; }
  int64_t window_start(int64_t pos) const { return window_ > 0 ? std::max<int64_t>(0, pos + 1 - window_) : 0; }
  void attend_row(float* qkv, const float* cos, const float* sin, int64_t r, float* kc, float* vc, int64_t capacity,
                  int64_t pos, float* attn, int64_t threads) const;
  void attend_head(int64_t hh, const float* q, const float* kc, const float* vc, int64_t capacity, int64_t pos,
                   float* attn) const;

  at::Tensor norm_w_, q_norm_w_, k_norm_w_, sinks_, o_w_, o_b_;
  std::vector<at::Tensor> qkv_w_, qkv_b_;
  std::vector<std::shared_ptr<QuantWeights>> qkv_q_;  // per projection: quantized (its weight empty) or null
  std::shared_ptr<QuantWeights> o_q_;
  float eps_, qk_eps_, clip_, scale_;
  bool full_qk_norm_;
  int64_t window_, rows_[3];
};

// x + o_proj(MLA(norm(x))) for one token of a multi-head latent attention block, reading the latent cache with
// the up-projection absorbed (decode_mla.cpp); with DeepSeek Sparse Attention's indexer, over the index_topk keys
// it picks. Caches: latents [1, capacity, C], rotary keys [1, capacity, R] (and indexer keys [1, capacity, Di]).
class MlaDecode : public DecodeAttention {
 public:
  MlaDecode(at::Tensor norm_w, double eps, at::Tensor q_a_w, at::Tensor q_a_b, at::Tensor q_norm_w, at::Tensor q_b_w,
            at::Tensor kv_a_w, at::Tensor kv_a_b, at::Tensor kv_norm_w, at::Tensor kv_b_w, at::Tensor o_w,
            at::Tensor o_b, int64_t heads, int64_t nope, int64_t rope, int64_t v, double latent_eps, double scale,
            bool interleave, double query_beta, int64_t query_length, at::Tensor index_q_w, at::Tensor index_k_w,
            at::Tensor index_norm_w, at::Tensor index_norm_b, at::Tensor index_weights_w, int64_t index_topk,
            bool index_interleave);
  // x [D]; cos, sin [rope]; the caches, the new entries going to index pos. Returns x + attention [D].
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> caches, int64_t pos,
                     int64_t threads) const;
  void step(const float* x, float* y, const float* cos, const float* sin, int64_t r, const Caches& caches, int64_t pos,
            int64_t threads) const override;
  void check(const Caches& caches, int64_t pos) const override;
  int64_t rope_width() const override { return rope_; }
  // B independent rows: x [B, D]; cos, sin [B, rope]; caches [B, capacity, width] (row b's slot); positions [B]
  // int64, where each row's new entries go. Returns x + attention [B, D].
  at::Tensor forward_rows(at::Tensor x, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> caches,
                          at::Tensor positions, int64_t threads) const;

 private:
  void attend_head(float* q_h, int64_t hh, const float* lc, const float* rc, const std::vector<int64_t>& keys,
                   int64_t pos, const float* cos, const float* sin, float* out) const;
  // the keys [0, pos] the indexer picks for the query (all of them while they fit in index_topk), ascending
  std::vector<int64_t> pick(const float* h, const float* q_low, const float* index_keys, int64_t pos,
                            const float* cos, const float* sin) const;

  at::Tensor norm_w_, q_a_w_, q_a_b_, q_norm_w_, q_b_w_, kv_a_w_, kv_a_b_, kv_norm_w_, kv_b_w_, o_w_, o_b_;
  at::Tensor index_q_w_, index_k_w_, index_norm_w_, index_norm_b_, index_weights_w_;
  int64_t heads_, nope_, rope_, v_, latent_ = 0, q_rank_ = 0, index_heads_ = 0, index_dim_ = 0, index_topk_;
  float eps_, latent_eps_, scale_, query_beta_;
  int64_t query_length_;
  bool interleave_, index_interleave_;
};

// attention(norm(x)) for one token of DeepSeek-V4's attention block (decode_compressed.cpp; no residual: the
// hyper-connections mix its output): one K = V head over a sliding window with sinks, plus the compressed entries
// of CSA (an overlapping compressor and the indexer's pick) or HCA (all of them); q-LoRA, the grouped output
// projection. Caches [1, capacity, width]: the window keys, each compressor's kv and gate inputs, then each one's
// entries (entry w at the slot of its window's last token).
class CompressedDecode {
 public:
  // compressor: [kv_proj, gate_proj, position_bias, norm] or none; indexer: its compressor's four, q_b_proj,
  // weights_proj, or none (CSA's overlapping compressor first).
  CompressedDecode(at::Tensor norm_w, double eps, at::Tensor q_a_w, at::Tensor q_norm_w, at::Tensor q_b_w,
                   at::Tensor kv_w, at::Tensor kv_norm_w, at::Tensor o_a_w, at::Tensor o_b_w, at::Tensor sinks,
                   int64_t heads, int64_t head_dim, int64_t groups, double block_eps, int64_t window, double scale,
                   std::vector<at::Tensor> compressor, int64_t rate, bool overlap, std::vector<at::Tensor> indexer,
                   int64_t index_heads, int64_t index_dim, int64_t index_topk);
  // x [D]; cos, sin [r] at pos (each frequency twice); inv_freq [r / 2] and factor: the rotation of the entries
  // at their windows' first positions. Writes the new token's rows at pos. Returns attention(norm(x)) [D].
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor inv_freq, double factor,
                     std::vector<at::Tensor> caches, int64_t pos, int64_t threads) const;
  // The step on raw rows: y [D] = attention(norm(x)) (y may not be x).
  void step(const float* x, float* y, const float* cos, const float* sin, int64_t r, const float* inv_freq,
            float factor, const Caches& caches, int64_t pos, int64_t threads) const;
  void check(const Caches& caches, int64_t pos) const;
  int64_t d = 0;

 private:
  struct Pool {  // a compressor: every `rate` tokens' projections pooled into one entry of `dim`
    Pool(const std::vector<at::Tensor>& parts, int64_t d, int64_t dim, int64_t rate, bool overlap);
    void entry(const float* kv, const float* gate, int64_t w, const float* inv_freq, float factor, int64_t r,
               float eps, float* out) const;
    int64_t dim, width, rate;
    bool overlap;
    std::vector<at::Tensor> weights;
    const float *kv_w, *gate_w, *bias, *norm_w;
  };
  int64_t cache_count() const;
  std::vector<int64_t> picked(float* iq, float* iw, const Caches& caches, int64_t visible, const float* cos,
                              const float* sin, int64_t r) const;

  at::Tensor norm_w_, q_a_w_, q_norm_w_, q_b_w_, kv_w_, kv_norm_w_, o_a_w_, o_b_w_, sinks_, index_q_w_,
      index_weights_w_;
  std::vector<Pool> pools_;
  int64_t heads_, head_dim_, groups_, window_, index_heads_, index_dim_, index_topk_, q_rank_ = 0, o_rank_ = 0;
  float eps_, block_eps_, scale_;
};

enum ScoreFunction { kSoftmaxScores = 0, kSigmoidScores = 1, kSqrtSoftplusScores = 2 };

// x + ffn(norm(x)) for one token, where ffn is a token-choice MoE block (router, top-k routing, the k experts, the
// shared expert, combine; the routed experts fp32 or quantized) or, with no experts, a dense FFN: the shared-expert part alone (decode_moe.cpp); or for a
// batch of tokens (ffn_tokens.cpp). Without a norm weight and the residual: ffn(x), the block alone.
class FfnDecode {
 public:
  FfnDecode(at::Tensor norm_w, double eps, bool residual, at::Tensor router_w, at::Tensor router_b, at::Tensor selection_bias,
            int64_t score_function, bool softmax_after_topk, int64_t top_k, bool normalize, double normalize_eps,
            double scaling, bool apply_to_input, at::Tensor up_w, at::Tensor down_w, at::Tensor up_b,
            at::Tensor down_b, bool transposed, bool gated, bool interleaved, int64_t activation, double alpha,
            double limit, at::Tensor shared_gate_w, at::Tensor shared_up_w, at::Tensor shared_down_w,
            at::Tensor shared_sigmoid_w, std::vector<std::shared_ptr<QuantWeights>> up_quant,
            std::vector<std::shared_ptr<QuantWeights>> down_quant, at::Tensor expert_place,
            std::vector<std::shared_ptr<QuantWeights>> shared_quant, int64_t n_group, int64_t topk_group,
            bool group_top2);
  // x [D] -> (x + ffn [D] (or ffn alone), the chosen experts [k] in selection order, tokens per expert [E]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(at::Tensor x, int64_t threads) const;
  // The step on raw rows: y [D] = x + ffn (y may be x); ids [top_k] receives the chosen experts; fixed: the
  // experts a token table chose (DeepSeek-V4's first layers), weighted by their scores, or null.
  void run(const float* x, float* y, int64_t* ids, int64_t threads, const int64_t* fixed = nullptr) const;
  // x [T, D] -> (x + ffn [T, D] (or ffn alone), the chosen experts [T, k], tokens per expert [E]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_tokens(at::Tensor x, int64_t threads) const;

  int64_t d, experts, top_k;

 private:
  void route(const float* h, int64_t* ids, float* weights, const int64_t* fixed = nullptr) const;
  void add_router_bias(float* logits, int64_t tokens) const;
  void choose(const float* logits, int64_t* ids, float* weights, const int64_t* fixed = nullptr) const;
  void limit_to_groups(float* choice) const;
  // ys[j] = expert ids[j]'s matrix of `stacks` @ xs[j], each expert read from its format's stack at its slot
  void expert_products(const std::vector<std::shared_ptr<QuantWeights>>& stacks, const int64_t* ids,
                       const float* const* xs, float* const* ys, int64_t k, int64_t threads) const;

  at::Tensor norm_w_, router_w_, router_b_, selection_bias_, up_w_, down_w_, up_b_, down_b_;
  at::Tensor shared_gate_w_, shared_up_w_, shared_down_w_, shared_sigmoid_w_;
  // quantized routed experts (then up_w_ and down_w_ are empty): one stack, or one per format where experts differ
  // in format (place_: each expert's stack and slot in it, [E, 2])
  std::vector<std::shared_ptr<QuantWeights>> up_q_, down_q_;
  std::vector<int64_t> place_;
  std::vector<std::shared_ptr<QuantWeights>> shared_q_;  // the shared / dense gate, up, down: quantized or null
  float eps_, normalize_eps_, scaling_, alpha_, limit_;
  bool residual_, softmax_after_topk_, normalize_, apply_to_input_, transposed_, gated_, interleaved_,
      group_top2_;
  int64_t activation_, x_rows_, f_, fs_, n_group_, topk_group_, score_function_;
};

// Rotary angles of position pos, each frequency twice as RotaryEmbedding lays them out: [f0..fn-1, f0..fn-1]
// times factor; cos and sin get 2 * inv_freq.numel() values.
void rope_angles(int64_t pos, const at::Tensor& inv_freq, double factor, std::vector<float>& cos,
                 std::vector<float>& sin);

// A chain step's token id, checked against the vocabulary.
int64_t chain_token(const at::Tensor& token, int64_t vocab);
// Whether a chain step records each layer's chosen experts in routed (int64 [layers, k >= top_k]; empty: no).
bool keeps_routes(const at::Tensor& routed, const std::vector<std::shared_ptr<FfnDecode>>& ffn);

// A decode chain's output head: logits [1, 1, rows] = head_w @ h (+ head_b), head_w fp32 or quantized.
class OutputHead {
 public:
  OutputHead(at::Tensor w, at::Tensor b, std::shared_ptr<QuantWeights> q, int64_t d);
  at::Tensor logits(const float* h, const at::TensorOptions& options, int64_t threads) const;

 private:
  at::Tensor w_, b_;
  std::shared_ptr<QuantWeights> q_;
  int64_t rows_;
};

// A whole decoder step for one token: embedding row, every layer's attention and FFN blocks, final RMSNorm and the
// output head, in one call (decode_chain.cpp). Between layers nothing returns to Python: at one token of a small
// model, the fixed costs of the calls, checks and views there (each some tens of microseconds with the caches cold
// from streaming weights) add up to a tenth of the step.
class DecodeChain {
 public:
  DecodeChain(at::Tensor embed_w, std::vector<std::shared_ptr<DecodeAttention>> attention,
              std::vector<std::shared_ptr<FfnDecode>> ffn, std::vector<bool> rope_layers, at::Tensor norm_w,
              double eps, at::Tensor head_w, at::Tensor head_b, std::shared_ptr<QuantWeights> head_quant);
  // token [1, 1] int64 at position pos; rotary angles pos * inv_freq (cos, sin times rope_factor; inv_freq of
  // rope_dim / 2); each layer's caches; routed: empty, or int64 [layers, k] that receives each MoE layer's
  // chosen experts in its first top_k entries. Returns the logits [1, 1, V].
  at::Tensor step(at::Tensor token, int64_t pos, at::Tensor inv_freq, double rope_factor,
                  std::vector<std::vector<at::Tensor>> caches, at::Tensor routed, int64_t threads) const;

 private:
  at::Tensor embed_w_, norm_w_;
  OutputHead head_;
  std::vector<std::shared_ptr<DecodeAttention>> attention_;
  std::vector<std::shared_ptr<FfnDecode>> ffn_;
  std::vector<bool> rope_layers_;
  float eps_;
};

// A whole decoder step of a model with hyper-connected streams (DeepSeek-V4) for one token, in one call
// (decode_hyper.cpp): the embedding row copied into every stream; per layer the attention block's weights and
// collapse, its step, the mix, the same for the MoE block (its experts from a token table on table layers); the
// head's collapse, the final norm and the output head.
class HyperDecodeChain {
 public:
  // hyper: per layer the attention's then the FFN's connection (fn, base, scale: six tensors); tables: per layer
  // int64 [vocab, k] or empty; sliding_rope: per layer whether it takes the sliding rotation (sliding_inv_freq,
  // sliding_factor) instead of the main one; head_hyper: the head's (fn, base, scale).
  HyperDecodeChain(at::Tensor embed_w, std::vector<std::shared_ptr<CompressedDecode>> attention,
                   std::vector<std::shared_ptr<FfnDecode>> ffn, std::vector<at::Tensor> hyper,
                   std::vector<at::Tensor> tables, std::vector<bool> sliding_rope, at::Tensor sliding_inv_freq,
                   double sliding_factor, int64_t iters, double hyper_eps, double hyper_norm_eps,
                   std::vector<at::Tensor> head_hyper, at::Tensor norm_w, double eps, at::Tensor head_w,
                   at::Tensor head_b, std::shared_ptr<QuantWeights> head_quant);
  // As DecodeChain::step; inv_freq and rope_factor: the main rotation (compressed layers, every entry).
  at::Tensor step(at::Tensor token, int64_t pos, at::Tensor inv_freq, double rope_factor,
                  std::vector<std::vector<at::Tensor>> caches, at::Tensor routed, int64_t threads) const;

 private:
  at::Tensor embed_w_, norm_w_, sliding_inv_freq_;
  OutputHead head_;
  std::vector<std::shared_ptr<CompressedDecode>> attention_;
  std::vector<std::shared_ptr<FfnDecode>> ffn_;
  std::vector<at::Tensor> hyper_, tables_, head_hyper_;
  std::vector<bool> sliding_rope_;
  int64_t streams_ = 0, iters_;
  float sliding_factor_, hyper_eps_, hyper_norm_eps_, eps_;
};
