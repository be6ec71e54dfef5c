// The Python module of moekit's kernels (moekit/experts/gemv.py builds and loads it).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segment_gemm", &segment_gemm);
  m.def("segment_grad_weight", &segment_grad_weight);
  m.def("gather_gemv", &gather_gemv);
  m.def("linear_gemv", &linear_gemv);
  m.def("mm_tasks", &mm_tasks);
  m.def("attention_decode", &attention_decode);
  m.def("moe_decode", &moe_decode);
}
