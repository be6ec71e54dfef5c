"""A linear layer whose weight stays quantized (FP8 blocks, INT4, MXFP4, ...): the parts under the checkpoint's
names (weight + weight_scale_inv, weight_packed + weight_scale, ...), the bias as a float parameter. The reference
forward dequantizes this one weight per call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.kernels.quantized import quant_gemv
from moekit.quant.formats import Format
from moekit.quant.held import QuantizedModule


class QuantizedLinear(QuantizedModule):
    def __init__(self, in_features: int, out_features: int, fmt: Format, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.hold("weight", (out_features, in_features), device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, fmt: Format) -> QuantizedLinear:
        """The quantized counterpart of linear, on its device (meta stays meta), its weight quantized unless meta."""
        device = linear.weight.device
        q = cls(linear.in_features, linear.out_features, fmt, linear.bias is not None, device=device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        if not linear.weight.is_meta:
            q.store("weight", linear.weight.detach())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:  # one row (decode): the kernel reads the bytes where it takes them
            y = quant_gemv(self, "weight", None, x.reshape(1, -1))
            if y is not None:
                y = y.view(*x.shape[:-1], -1)
                return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized("weight", x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}"
