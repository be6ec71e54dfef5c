"""A layer's routed experts left in the checkpoint's files: what a model loaded with an expert memory budget holds
in place of ExpertWeights or QuantizedExperts (moekit.infer.expert_cache reads them into a shared pool of slots as
tokens need them)."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.experts.layout import ExpertLayout
from moekit.experts.quantized import QuantizedExperts
from moekit.experts.weights import ExpertWeights
from moekit.model.meta import materialize
from moekit.quant.formats import Format


class ExpertsOnDisk(nn.Module):
    """No parameters: the experts' shapes, layout, dtype (and quantized format: fmt, with gate_up_pieces as
    QuantizedExperts has them), and where their bytes lie (pieces: {expert: [Piece]},
    moekit.checkpoint.expert_files)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        expert_hidden: int,
        layout: ExpertLayout,
        dtype: torch.dtype,
        fmt: Format | None = None,
        gate_up_pieces: int = 1,
    ):
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_hidden = num_experts, hidden_size, expert_hidden
        self.layout, self.dtype, self.fmt, self.gate_up_pieces = layout, dtype, fmt, gate_up_pieces
        self.pieces: dict[int, list] = {}

    @classmethod
    def like(cls, experts: nn.Module) -> ExpertsOnDisk:
        """The on-disk stand-in of a (meta) ExpertWeights or QuantizedExperts."""
        e = experts
        if isinstance(e, QuantizedExperts):
            pieces = e.held("gate_up_proj")[1]
            dtype = e.gate_up_proj_bias.dtype if e.gate_up_proj_bias is not None else torch.get_default_dtype()
            return cls(e.num_experts, e.hidden_size, e.expert_hidden, e.layout, dtype, e.fmt, pieces)
        return cls(e.num_experts, e.hidden_size, e.expert_hidden, e.layout, e.gate_up_proj.dtype)

    def part_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{part: (shape of one expert's part, dtype)}: the pool's tensors, named as the model's state dict names
        them (gate_up_proj, down_proj and biases; a quantized format's parts, e.g. gate_up_proj_blocks / _scales)."""
        return {name: (tuple(t.shape[1:]), t.dtype) for name, t in self._pool_on_meta(1).state_dict().items()}

    def expert_bytes(self) -> int:
        """Bytes one expert takes in memory."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.part_specs().values())

    def pool(self, slots: int) -> nn.Module:
        """A stack of `slots` experts of this kind (uninitialised memory) for the expert cache to fill."""
        return materialize(self._pool_on_meta(slots)).requires_grad_(False)

    def _pool_on_meta(self, slots: int) -> nn.Module:
        d, f = self.hidden_size, self.expert_hidden
        with torch.device("meta"):
            if self.fmt is None:
                return ExpertWeights(slots, d, f, self.layout).to(self.dtype)
            return QuantizedExperts(slots, d, f, self.layout, self.fmt, self.gate_up_pieces).to(self.dtype)

    def extra_repr(self) -> str:
        e, d, f = self.num_experts, self.hidden_size, self.expert_hidden
        held = f", format={self.fmt.name}" if self.fmt is not None else ""
        return f"experts={e}, hidden={d}, expert_hidden={f}, layout={self.layout.describe()}{held}, on disk"
