"""nn.Linear whose one-row products at inference (decode) go through moekit's gemv kernel."""

from __future__ import annotations

import torch
from torch import nn

from moekit.experts.gemv import MIN_KERNEL_BYTES, gather_gemv


class Linear(nn.Linear):
    """Same parameters and state-dict keys as nn.Linear. A single input row under no_grad, with a weight large
    enough to stream from memory, uses the gemv kernel (MKL's one-row gemm reaches about half the bandwidth)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.numel() == x.shape[-1]
            and not torch.is_grad_enabled()
            and w.numel() * w.element_size() >= MIN_KERNEL_BYTES
        ):
            y = gather_gemv(w.unsqueeze(0), [0], x.reshape(1, -1)).view(*x.shape[:-1], -1)
            return y + self.bias if self.bias is not None else y
        return super().forward(x)
