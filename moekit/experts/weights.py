"""Stacked expert weights: all E experts of a layer in two 3-D tensors, as Hugging Face v5 stores them."""

from __future__ import annotations

import torch
from torch import nn

from moekit.experts import huge_pages
from moekit.experts.layout import ExpertLayout


def expert_part_shapes(hidden_size: int, expert_hidden: int, layout: ExpertLayout) -> dict[str, tuple[int, ...]]:
    """{part: the shape of one expert's part} (gate_up_proj, down_proj, and their biases where the layout has them)."""
    up_width = 2 * expert_hidden if layout.gated else expert_hidden
    shapes = {
        "gate_up_proj": (hidden_size, up_width) if layout.transposed else (up_width, hidden_size),
        "down_proj": (expert_hidden, hidden_size) if layout.transposed else (hidden_size, expert_hidden),
    }
    if layout.bias:
        shapes.update(gate_up_proj_bias=(up_width,), down_proj_bias=(hidden_size,))
    return shapes


class ExpertWeights(nn.Module):
    """gate_up_proj  [E, 2F, D] (gated) or [E, F, D]; [E, D, 2F] / [E, D, F] when layout.transposed.
    down_proj     [E, D, F]; [E, F, D] when layout.transposed.
    gate_up_proj_bias [E, 2F], down_proj_bias [E, D] when layout.bias.
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int, layout: ExpertLayout):
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_hidden = num_experts, hidden_size, expert_hidden
        self.layout = layout
        shapes = expert_part_shapes(hidden_size, expert_hidden, layout)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, *shapes["gate_up_proj"]))
        self.down_proj = nn.Parameter(torch.empty(num_experts, *shapes["down_proj"]))
        if layout.bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, *shapes["gate_up_proj_bias"]))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, *shapes["down_proj_bias"]))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        if not self.gate_up_proj.is_meta:  # a meta model (counting, loading) has nothing to initialise
            huge_pages.rehome(self)
            self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def expert_params(self) -> int:
        """Parameters of one expert."""
        return sum(p[0].numel() for p in self.parameters())

    def extra_repr(self) -> str:
        e, d, f = self.num_experts, self.hidden_size, self.expert_hidden
        return f"experts={e}, hidden={d}, expert_hidden={f}, layout={self.layout.describe()}"
