"""SwiGLU over a batch of expert rows in one pass each way (csrc/swiglu.cpp). torch's composition of silu(gate) * up
from concatenated [gate | up] rows runs five or six passes over them between forward and backward (silu, the
product, both backward passes and the cat joining the two halves of the gradient). Where the kernel does not take
the rows (GPUs, other dtypes, small batches, no compiler) the caller computes the same with torch's ops."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moekit.kernels.build import kernel_for


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_SX, kernel):  # type: ignore[override]
        ctx.save_for_backward(h_SX)
        ctx.kernel = kernel
        return _forward(h_SX, kernel)

    @staticmethod
    @once_differentiable
    def backward(ctx, da_SF):  # type: ignore[override]
        (h_SX,) = ctx.saved_tensors
        dh_SX = torch.empty_like(h_SX)
        ctx.kernel.swiglu_rows_backward(h_SX, da_SF.contiguous(), dh_SX, torch.get_num_threads())
        return dh_SX, None


def _forward(h_SX: torch.Tensor, kernel) -> torch.Tensor:
    a_SF = h_SX.new_empty(h_SX.shape[0], h_SX.shape[1] // 2)
    kernel.swiglu_rows(h_SX, a_SF, torch.get_num_threads())
    return a_SF


def swiglu(h_SX: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of [S, 2F] concatenated rows by moekit's kernel, with its gradient; None where the kernel
    does not take them."""
    if h_SX.dim() != 2 or h_SX.shape[1] % 2 or not h_SX.is_contiguous():
        return None
    kernel = kernel_for(h_SX.numel() * h_SX.element_size(), h_SX)
    if kernel is None:
        return None
    if torch.is_grad_enabled() and h_SX.requires_grad:
        return _SwiGLU.apply(h_SX, kernel)
    return _forward(h_SX, kernel)
