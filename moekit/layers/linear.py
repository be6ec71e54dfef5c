"""nn.Linear whose one-row products at inference (decode) go through moekit's gemv kernel."""

from __future__ import annotations

import torch
from torch import nn

from moekit.experts.gemv import linear_gemv


class Linear(nn.Linear):
    """Same parameters and state-dict keys as nn.Linear. A single input row under no_grad uses the gemv kernel
    (MKL's one-row gemm reaches about half the bandwidth); the kernel itself declines products too small to stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _one_row(x):
            return _with_bias(linear_gemv([self.weight], x.reshape(-1))[0], self.bias).view(*x.shape[:-1], -1)
        return super().forward(x)


def project(linears: tuple[nn.Linear, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each linear layer applied to x; at decode (one row, no_grad) all of them in one pass of the kernel, which
    for the q, k and v projections of a step turns three short streams into one long one."""
    if not _one_row(x):
        return tuple(linear(x) for linear in linears)
    ys = linear_gemv([linear.weight for linear in linears], x.reshape(-1))
    return tuple(_with_bias(y, lin.bias).view(*x.shape[:-1], -1) for y, lin in zip(ys, linears, strict=True))


def _one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1] and not torch.is_grad_enabled()


def _with_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias
