"""RMSNorm, computed in fp32 like every published family does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the same math in one call (decode runs hundreds)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The block norm a ModelConfig asks for: rms, layer (LayerNorm with bias), layer_nobias."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=kind == "layer")
