"""A layer's routed experts left in the checkpoint's files: what a model loaded with an expert memory budget holds
in place of ExpertWeights (moekit.infer.expert_cache reads them into a shared pool of slots as tokens need them)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.experts.layout import ExpertLayout
from moekit.experts.weights import expert_part_shapes


class ExpertsOnDisk(nn.Module):
    """No parameters: the experts' shapes, layout and dtype, and where their bytes lie (pieces: {expert: [Piece]},
    moekit.checkpoint.expert_files)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int, layout: ExpertLayout, dtype):
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_hidden = num_experts, hidden_size, expert_hidden
        self.layout, self.dtype = layout, dtype
        self.pieces: dict[int, list] = {}

    def part_shapes(self) -> dict[str, tuple[int, ...]]:
        return expert_part_shapes(self.hidden_size, self.expert_hidden, self.layout)

    def expert_bytes(self) -> int:
        """Bytes one expert takes in memory (in the model's dtype)."""
        return sum(torch.Size(s).numel() for s in self.part_shapes().values()) * self.dtype.itemsize

    def extra_repr(self) -> str:
        e, d, f = self.num_experts, self.hidden_size, self.expert_hidden
        return f"experts={e}, hidden={d}, expert_hidden={f}, layout={self.layout.describe()}, on disk"
