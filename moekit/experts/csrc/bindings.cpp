// The Python module of moekit's kernels (moekit/experts/gemv.py builds and loads it).
#include <torch/extension.h>

#include "decode.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segment_gemm", &segment_gemm);
  m.def("segment_gemm_input_major", &segment_gemm_input_major);
  m.def("segment_grad_weight", &segment_grad_weight);
  m.def("gather_gemv", &gather_gemv);
  m.def("linear_gemv", &linear_gemv);
  m.def("mm_tasks", &mm_tasks);
  m.def("slot_sums", &slot_sums);
  m.def("row_grads", &row_grads);
  m.def("swiglu_rows", &swiglu_rows);
  m.def("swiglu_rows_backward", &swiglu_rows_backward);
  py::class_<AttentionDecode, std::shared_ptr<AttentionDecode>>(m, "AttentionDecode")
      .def(py::init<at::Tensor, double, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, at::Tensor,
                    at::Tensor, bool, double, double, int64_t, double, at::Tensor, at::Tensor, at::Tensor>())
      .def("__call__", &AttentionDecode::forward);
  py::class_<FfnDecode, std::shared_ptr<FfnDecode>>(m, "FfnDecode")
      .def(py::init<at::Tensor, double, bool, at::Tensor, at::Tensor, at::Tensor, bool, bool, int64_t, bool, double, double,
                    bool, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool, bool, bool, int64_t, double, double,
                    at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("__call__", &FfnDecode::forward)
      .def("tokens", &FfnDecode::forward_tokens);
  py::class_<DecodeChain, std::shared_ptr<DecodeChain>>(m, "DecodeChain")
      .def(py::init<at::Tensor, std::vector<std::shared_ptr<AttentionDecode>>, std::vector<std::shared_ptr<FfnDecode>>,
                    std::vector<bool>, at::Tensor, double, at::Tensor, at::Tensor>())
      .def("step", &DecodeChain::step);
}
