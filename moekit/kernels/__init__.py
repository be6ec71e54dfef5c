"""moekit's C++ kernels (csrc/) in one room: building and loading them (build.py) and their Python wrappers (products,
rows, swiglu), each falling back to torch's ops where the kernel does not take its tensors. The fused inference
steps built from a model's modules live in moekit.infer.fast."""

from moekit.kernels.build import MIN_KERNEL_BYTES, kernel_available, kernel_for, kernel_taking, load_kernel
from moekit.kernels.products import (
    GRAD_WEIGHT_ROWS,
    INPUT_MAJOR_ROWS,
    TILED_ROWS,
    gather_gemv,
    linear_gemv,
    segment_gemm,
    segment_gemm_input_major,
    segment_grad_weight,
)
from moekit.kernels.rows import row_grads, slot_sums
from moekit.kernels.swiglu import swiglu

__all__ = [
    "GRAD_WEIGHT_ROWS",
    "INPUT_MAJOR_ROWS",
    "MIN_KERNEL_BYTES",
    "TILED_ROWS",
    "gather_gemv",
    "kernel_available",
    "kernel_for",
    "kernel_taking",
    "linear_gemv",
    "load_kernel",
    "row_grads",
    "segment_gemm",
    "segment_gemm_input_major",
    "segment_grad_weight",
    "slot_sums",
    "swiglu",
]
