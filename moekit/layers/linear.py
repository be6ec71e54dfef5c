"""nn.Linear whose one-row products at inference (decode) go through moekit's gemv kernel."""

from __future__ import annotations

import torch
from torch import nn

from moekit.kernels.products import linear_gemv


class Linear(nn.Linear):
    """Same parameters and state-dict keys as nn.Linear. A single input row under no_grad uses the gemv kernel
    (MKL's one-row gemm reaches about half the bandwidth); the kernel itself declines products too small to stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _one_row(x):
            return _row_products((self,), x)[0]
        return super().forward(x)


def project(linears: tuple[nn.Linear, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each linear layer applied to x; at decode (one row, no_grad) all of them in one pass of the kernel, which
    for the q, k and v projections of a step turns three short streams into one long one."""
    if not _one_row(x) or not all(isinstance(linear, nn.Linear) for linear in linears):  # quantized: their own
        return tuple(linear(x) for linear in linears)
    return _row_products(linears, x)


def _one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1] and not torch.is_grad_enabled()


def _row_products(linears: tuple[nn.Linear, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ys = linear_gemv([lin.weight for lin in linears], x.reshape(-1), [lin.bias for lin in linears])
    return tuple(y.view(*x.shape[:-1], -1) for y in ys)
