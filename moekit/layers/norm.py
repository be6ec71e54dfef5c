"""RMSNorm, computed in fp32 like every published family does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, the mean taken in fp32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the same math in one call (decode runs hundreds)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * unweighted_rms_norm(x.float(), self.eps).to(x.dtype)


class OffsetRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as its offset from 1 (zero-centred: Qwen3-Next, Qwen3.5), the product taken
    in fp32 before the cast back (not a subclass of RMSNorm: the fused steps read plain weights)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (unweighted_rms_norm(x.float(), self.eps) * (1.0 + self.weight.float())).type_as(x)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The block norm a ModelConfig asks for: rms, rms_offset (weight stored as 1 + w), layer (LayerNorm with bias),
    layer_nobias."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "rms_offset":
        return OffsetRMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=kind == "layer")
