"""nn.Linear whose one-row and few-row products at inference (decode, at batch 1 or a few sequences) go through
moekit's kernels."""

from __future__ import annotations

import torch
from torch import nn

from moekit.kernels.limits import LINEAR_ROWS
from moekit.kernels.products import linear_gemv, segment_gemm


class Linear(nn.Linear):
    """Same parameters and state-dict keys as nn.Linear. Under no_grad a single input row uses the gemv kernel
    (MKL's one-row gemm reaches about half the bandwidth), up to LINEAR_ROWS rows the segment kernel (each weight
    row read once for all of them); the kernels decline products too small to stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _one_row(x):
            return _row_products((self,), x)[0]
        rows = x.numel() // max(x.shape[-1], 1)
        if 1 < rows <= LINEAR_ROWS and not torch.is_grad_enabled():
            x_RI = x.reshape(rows, -1).contiguous()
            y_RO = x_RI.new_empty(rows, self.out_features)
            if segment_gemm(self.weight[None], x_RI, [(0, 0, rows)], y_RO):
                y_RO = y_RO if self.bias is None else y_RO + self.bias
                return y_RO.view(*x.shape[:-1], -1)
        return super().forward(x)


def project(linears: tuple[nn.Linear, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each linear layer applied to x; at decode (one row, no_grad) all of them in one pass of the kernel, which
    for the q, k and v projections of a step turns three short streams into one long one."""
    if not _one_row(x) or not all(isinstance(linear, nn.Linear) for linear in linears):  # quantized: their own
        return tuple(linear(x) for linear in linears)
    return _row_products(linears, x)


def float_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight [out, in] in dtype: its parameter, or a quantized layer's weight dequantized."""
    return linear.weight.to(dtype) if isinstance(linear, nn.Linear) else linear.dequantized("weight", dtype)


def _one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1] and not torch.is_grad_enabled()


def _row_products(linears: tuple[nn.Linear, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ys = linear_gemv([lin.weight for lin in linears], x.reshape(-1), [lin.bias for lin in linears])
    return tuple(y.view(*x.shape[:-1], -1) for y in ys)
