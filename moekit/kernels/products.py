"""The Python face of moekit's C++ product kernels: expert segments (tiled forward, input-major, weight gradients),
one-row gathers (decode's k experts), several projections of one input row in one pass.

At decode a token's k experts each multiply one row (and so do the attention projections and the output head):
gemvs whose cost is reading the weights. On this class of CPU, MKL's gemv reaches 35-60% of the streaming
bandwidth on expert-sized matrices (short rows, small matrices, one thread pool hand-off per call), and its
few-row gemm about half; for segments of a few dozen rows it spends much of its time packing weights it uses for
only those rows; and a weight gradient of a few rows is all writes, which plain stores double. The kernels read
weight rows in place, once for all the rows of their segment (AVX2/FMA), and write weight gradients as outer
products over packed panels, each element streamed out once. Each wrapper returns False or falls back to torch
where the kernel does not take its tensors; both agree up to float rounding.

Shape letters here are a product's: x_SI [rows, I], w_EOI [experts, O, I]; I the contraction (input) width, O the
output width."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.kernels.build import kernel_for, kernel_taking
from moekit.kernels.limits import GRAD_WEIGHT_ROWS, INPUT_MAJOR_ROWS, MIN_GEMV_BYTES, TILED_ROWS  # noqa: F401


def segment_gemm(
    w_EOI: torch.Tensor, x_SI: torch.Tensor, segments: list[tuple[int, int, int]], y_SO: torch.Tensor
) -> bool:
    """Fill the rows of each (expert, start, count) segment of y_SO with those x rows times the expert's matrix;
    False (nothing written) when the kernel cannot take it: too little to stream (under MIN_KERNEL_BYTES of
    weights, where any kernel is fast), not fp32 contiguous CPU tensors, or no kernel here."""
    return _run_segments("segment_gemm", w_EOI, segments, w_EOI, x_SI, y_SO)


def segment_gemm_input_major(
    w_EIO: torch.Tensor, x_SI: torch.Tensor, segments: list[tuple[int, int, int]], y_SO: torch.Tensor
) -> bool:
    """The same as segment_gemm for input-major weights: y rows = x rows @ w_EIO[e] ([I, O] each), count <=
    INPUT_MAJOR_ROWS; False (nothing written) where the kernel cannot take it."""
    return _run_segments("segment_gemm_input_major", w_EIO, segments, w_EIO, x_SI, y_SO)


def segment_grad_weight(
    x_SI: torch.Tensor, dy_SO: torch.Tensor, segments: list[tuple[int, int, int]], dw_EOI: torch.Tensor
) -> bool:
    """dw_EOI[e] = dy^T x over the rows of each (expert, start, count) segment, count <= GRAD_WEIGHT_ROWS (0: zeros),
    each dw row written once (streaming stores); False (nothing written) where the kernel cannot take it."""
    return _run_segments("segment_grad_weight", dw_EOI, segments, x_SI, dy_SO, dw_EOI)


def _run_segments(
    name: str, w_EOI: torch.Tensor, segments: list[tuple[int, int, int]], *operands: torch.Tensor
) -> bool:
    """Run the kernel's `name`(operands[0], operands[1], experts, starts, counts, operands[2], threads) when it can
    take these tensors; w_EOI, the weight-shaped one of them, decides whether the product is large enough."""
    nbytes = len(segments) * w_EOI[0].numel() * w_EOI.element_size()
    kernel = kernel_for(nbytes, *operands) if segments else None
    if kernel is None or not all(t.is_contiguous() for t in operands):
        return False
    first, second, out = operands
    getattr(kernel, name)(first, second, *_segment_table(segments), out, torch.get_num_threads())
    return True


def _segment_table(segments: list[tuple[int, int, int]]) -> tuple[torch.Tensor, ...]:
    """Experts, starts and counts as three contiguous int64 tensors."""
    return tuple(torch.tensor(segments, dtype=torch.long).t().contiguous())


def gather_gemv(w_EOI: torch.Tensor, ids: list[int] | torch.Tensor, x_SI: torch.Tensor) -> torch.Tensor:
    """y_SO[r] = w_EOI[ids[r]] @ x_SI[r]: one-row segments; x_SI may be one row expanded (row stride 0) to all of
    them, as the k experts of one token share it. For inference: no autograd graph is recorded."""
    if x_SI.stride(-1) != 1:
        x_SI = x_SI.contiguous()
    y_SO = x_SI.new_empty(x_SI.shape[0], w_EOI.shape[1])
    nbytes = _num_ids(ids) * w_EOI[0].numel() * w_EOI.element_size()
    kernel = kernel_taking(w_EOI, x_SI) if nbytes >= MIN_GEMV_BYTES else None
    if kernel is not None and w_EOI.is_contiguous():
        ids_S = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
        kernel.gather_gemv(w_EOI, x_SI, ids_S.contiguous(), y_SO, torch.get_num_threads())
        return y_SO
    for r, e in enumerate(ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        torch.mv(w_EOI[e].detach(), x_SI[r].detach(), out=y_SO[r])
    return y_SO


def linear_gemv(
    weights: list[torch.Tensor], x_K: torch.Tensor, biases: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """[F.linear(x_K, w, b) for w, b in zip(weights, biases)] in one pass over all the weights (the q, k and v
    projections of one decode step share their input row). For inference: no autograd graph is recorded."""
    biases = biases if biases is not None else [None] * len(weights)
    x_K = x_K.contiguous()
    nbytes = sum(w.numel() for w in weights) * x_K.element_size()
    kernel = kernel_taking(*weights, x_K) if nbytes >= MIN_GEMV_BYTES else None
    if kernel is None or not all(w.is_contiguous() for w in weights):  # small, not fp32 (autocast too), no kernel
        return [F.linear(x_K, w, b) for w, b in zip(weights, biases, strict=True)]
    ys = [x_K.new_empty(w.shape[0]) for w in weights]
    kernel.linear_gemv(weights, x_K, ys, torch.get_num_threads())
    return [y if b is None else y + b for y, b in zip(ys, biases, strict=True)]


def _num_ids(ids: list[int] | torch.Tensor) -> int:
    return ids.numel() if isinstance(ids, torch.Tensor) else len(ids)
