"""A dense gated FFN: the dense layers of an MoE model, and shared experts."""

from __future__ import annotations

import torch
from torch import nn

from moekit.experts.layout import ExpertLayout, apply_activation, glu
from moekit.layers.linear import Linear


class FeedForward(nn.Module):
    """down(act(gate(x)) * up(x)) with the same activation choices as the experts (gate_proj/up_proj/down_proj)."""

    def __init__(self, hidden_size: int, ffn_hidden: int, layout: ExpertLayout | None = None):
        super().__init__()
        self.layout = layout or ExpertLayout()
        self.gate_proj = Linear(hidden_size, ffn_hidden, bias=self.layout.bias) if self.layout.gated else None
        self.up_proj = Linear(hidden_size, ffn_hidden, bias=self.layout.bias)
        self.down_proj = Linear(ffn_hidden, hidden_size, bias=self.layout.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(apply_activation(self.up_proj(x), self.layout))
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), self.layout))


def dense_layout(layout: ExpertLayout) -> ExpertLayout:
    """The layout of a dense FFN or shared expert beside experts of `layout`: same activation and biases, with its
    own gate_proj / up_proj (so never interleaved or transposed)."""
    return ExpertLayout(
        gated=layout.gated,
        activation=layout.activation,
        bias=layout.bias,
        swiglu_alpha=layout.swiglu_alpha,
        swiglu_limit=layout.swiglu_limit,
    )
