// The Python module of moekit's kernels (moekit/kernels/build.py builds and loads it). The steps' constructors take
// named arguments: moekit/infer/fast.py builds them from a model's modules.
#include <torch/extension.h>

#include "decode.h"

using QuantList = std::vector<std::shared_ptr<QuantWeights>>;  // per projection: quantized or None

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The inference kernels run without the GIL, as torch's own operators do: a server's event loop (another
  // thread) keeps serving while a step streams weights, instead of waiting for it or making it wait.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("segment_gemm", &segment_gemm, nogil);
  m.def("segment_gemm_input_major", &segment_gemm_input_major);
  m.def("segment_grad_weight", &segment_grad_weight);
  m.def("gather_gemv", &gather_gemv, nogil);
  m.def("linear_gemv", &linear_gemv, nogil);
  m.def("quant_gemv", &quant_gemv, nogil);
  m.def("quant_dequantize", &quant_dequantize);
  py::class_<QuantWeights, std::shared_ptr<QuantWeights>>(m, "QuantWeights")
      .def(py::init<int64_t, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, int64_t>(), py::kw_only(),
           py::arg("format"), py::arg("codes"), py::arg("scales"), py::arg("zero_points"), py::arg("block_rows"),
           py::arg("block_cols"), py::arg("pieces"), py::arg("cols"))
      .def_readonly("rows", &QuantWeights::rows)
      .def_readonly("cols", &QuantWeights::cols);
  m.def("mm_tasks", &mm_tasks);
  m.def("slot_sums", &slot_sums);
  m.def("row_grads", &row_grads);
  m.def("swiglu_rows", &swiglu_rows);
  m.def("hyper_weights", &hyper_weights, nogil);
  m.def("hyper_mix", &hyper_mix, nogil);
  m.def("swiglu_rows_backward", &swiglu_rows_backward);
  m.def("read_probe", &read_probe);
  m.def("set_row_limits", &set_row_limits);
  py::class_<DecodeAttention, std::shared_ptr<DecodeAttention>>(m, "DecodeAttention");
  py::class_<AttentionDecode, DecodeAttention, std::shared_ptr<AttentionDecode>>(m, "AttentionDecode")
      .def(py::init<at::Tensor, double, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, at::Tensor,
                    at::Tensor, bool, double, double, int64_t, double, at::Tensor, at::Tensor, at::Tensor, QuantList,
                    std::shared_ptr<QuantWeights>>(),
           py::kw_only(), py::arg("norm_weight"), py::arg("norm_eps"), py::arg("qkv_weights"), py::arg("qkv_biases"),
           py::arg("head_dim"), py::arg("q_norm_weight"), py::arg("k_norm_weight"), py::arg("full_qk_norm"),
           py::arg("qk_norm_eps"), py::arg("clip_qkv"), py::arg("window"), py::arg("scale"), py::arg("sinks"),
           py::arg("o_weight"), py::arg("o_bias"), py::arg("qkv_quant") = QuantList{}, py::arg("o_quant") = py::none())
      .def("__call__", &AttentionDecode::forward, nogil)
      .def("rows", &AttentionDecode::forward_rows, nogil);
  py::class_<MlaDecode, DecodeAttention, std::shared_ptr<MlaDecode>>(m, "MlaDecode")
      .def(py::init<at::Tensor, double, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, int64_t, double, double,
                    bool, double, int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t,
                    bool>(),
           py::kw_only(), py::arg("norm_weight"), py::arg("norm_eps"), py::arg("q_a_weight"), py::arg("q_a_bias"),
           py::arg("q_norm_weight"), py::arg("q_b_weight"), py::arg("kv_a_weight"), py::arg("kv_a_bias"),
           py::arg("kv_norm_weight"), py::arg("kv_b_weight"), py::arg("o_weight"), py::arg("o_bias"), py::arg("heads"),
           py::arg("nope_dim"), py::arg("rope_dim"), py::arg("v_dim"), py::arg("latent_eps"), py::arg("scale"),
           py::arg("interleave"), py::arg("query_beta"), py::arg("query_length"), py::arg("index_q_weight"),
           py::arg("index_k_weight"), py::arg("index_norm_weight"), py::arg("index_norm_bias"),
           py::arg("index_weights_weight"), py::arg("index_topk"), py::arg("index_interleave"))
      .def("__call__", &MlaDecode::forward, nogil)
      .def("rows", &MlaDecode::forward_rows, nogil);
  py::class_<CompressedDecode, std::shared_ptr<CompressedDecode>>(m, "CompressedDecode")
      .def(py::init<at::Tensor, double, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor, at::Tensor, int64_t, int64_t, int64_t, double, int64_t, double, std::vector<at::Tensor>,
                    int64_t, bool, std::vector<at::Tensor>, int64_t, int64_t, int64_t>(),
           py::kw_only(), py::arg("norm_weight"), py::arg("norm_eps"), py::arg("q_a_weight"), py::arg("q_norm_weight"),
           py::arg("q_b_weight"), py::arg("kv_weight"), py::arg("kv_norm_weight"), py::arg("o_a_weight"),
           py::arg("o_b_weight"), py::arg("sinks"), py::arg("heads"), py::arg("head_dim"), py::arg("groups"),
           py::arg("block_eps"), py::arg("window"), py::arg("scale"), py::arg("compressor"), py::arg("rate"),
           py::arg("overlap"), py::arg("indexer"), py::arg("index_heads"), py::arg("index_dim"),
           py::arg("index_topk"))
      .def("__call__", &CompressedDecode::forward, nogil);
  py::class_<HyperDecodeChain, std::shared_ptr<HyperDecodeChain>>(m, "HyperDecodeChain")
      .def(py::init<at::Tensor, std::vector<std::shared_ptr<CompressedDecode>>, std::vector<std::shared_ptr<FfnDecode>>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<bool>, at::Tensor, double, int64_t,
                    double, double, std::vector<at::Tensor>, at::Tensor, double, at::Tensor, at::Tensor,
                    std::shared_ptr<QuantWeights>>(),
           py::kw_only(), py::arg("embed_weight"), py::arg("attention"), py::arg("ffn"), py::arg("hyper"),
           py::arg("tables"), py::arg("sliding_rope"), py::arg("sliding_inv_freq"), py::arg("sliding_factor"),
           py::arg("sinkhorn_iters"), py::arg("hyper_eps"), py::arg("hyper_norm_eps"), py::arg("head_hyper"),
           py::arg("norm_weight"), py::arg("norm_eps"), py::arg("head_weight"), py::arg("head_bias"),
           py::arg("head_quant") = py::none())
      .def("step", &HyperDecodeChain::step, nogil);
  py::class_<FfnDecode, std::shared_ptr<FfnDecode>>(m, "FfnDecode")
      .def(py::init<at::Tensor, double, bool, at::Tensor, at::Tensor, at::Tensor, int64_t, bool, int64_t, bool, double, double,
                    bool, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool, bool, bool, int64_t, double, double,
                    at::Tensor, at::Tensor, at::Tensor, at::Tensor, QuantList, QuantList, at::Tensor, QuantList, int64_t,
                    int64_t, bool>(),
           py::kw_only(), py::arg("norm_weight"), py::arg("norm_eps"), py::arg("residual"), py::arg("router_weight"),
           py::arg("router_bias"), py::arg("selection_bias"), py::arg("score_function"), py::arg("softmax_after_topk"),
           py::arg("top_k"), py::arg("normalize"), py::arg("normalize_eps"), py::arg("scaling_factor"),
           py::arg("apply_to_input"), py::arg("gate_up_weight"), py::arg("down_weight"), py::arg("gate_up_bias"),
           py::arg("down_bias"), py::arg("transposed"), py::arg("gated"), py::arg("interleaved"), py::arg("activation"),
           py::arg("swiglu_alpha"), py::arg("swiglu_limit"), py::arg("shared_gate_weight"), py::arg("shared_up_weight"),
           py::arg("shared_down_weight"), py::arg("shared_sigmoid_weight"), py::arg("gate_up_quant"),
           py::arg("down_quant"), py::arg("expert_place"), py::arg("shared_quant") = QuantList{},
           py::arg("n_group") = 1, py::arg("topk_group") = 1, py::arg("group_top2") = false)
      .def("__call__", &FfnDecode::forward, nogil)
      .def("tokens", &FfnDecode::forward_tokens, nogil);
  py::class_<DecodeChain, std::shared_ptr<DecodeChain>>(m, "DecodeChain")
      .def(py::init<at::Tensor, std::vector<std::shared_ptr<DecodeAttention>>, std::vector<std::shared_ptr<FfnDecode>>,
                    std::vector<bool>, at::Tensor, double, at::Tensor, at::Tensor, std::shared_ptr<QuantWeights>>(),
           py::kw_only(), py::arg("embed_weight"), py::arg("attention"), py::arg("ffn"), py::arg("rope_layers"),
           py::arg("norm_weight"), py::arg("norm_eps"), py::arg("head_weight"), py::arg("head_bias"),
           py::arg("head_quant") = py::none())
      .def("step", &DecodeChain::step, nogil);
}
