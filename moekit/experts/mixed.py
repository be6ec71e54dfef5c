"""A layer's routed experts held quantized in several formats, each expert in its own (experts=auto: a hot or
sensitive expert in 8 bits, a rarely used one in 2): one QuantizedExperts per format holding its experts, in
expert order, and where each expert is. Per-expert checkpoints hold this directly (each expert's tensors in its
format); the loader fills the groups expert by expert and the saver splits them back."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moekit.experts.layout import ExpertLayout
from moekit.experts.quantized import QuantizedExperts
from moekit.quant.formats import Format

BASES = ("gate_up_proj", "down_proj")


class MixedExperts(nn.Module):
    """formats_E: the format of each expert. Biases (gpt-oss) stay float, over all experts."""

    def __init__(
        self,
        hidden_size: int,
        expert_hidden: int,
        layout: ExpertLayout,
        formats_E: list[Format],
        gate_up_pieces: int = 1,
        device=None,
    ):
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_hidden = len(formats_E), hidden_size, expert_hidden
        self.layout = replace(layout, transposed=False)
        self.formats = list(dict.fromkeys(formats_E))  # each format once, in order of first use
        self.members = [[e for e, f in enumerate(formats_E) if f == fmt] for fmt in self.formats]
        self.place_E = [(0, 0)] * self.num_experts  # (group, slot) of each expert
        for g, members in enumerate(self.members):
            for slot, e in enumerate(members):
                self.place_E[e] = (g, slot)
        unbiased = replace(self.layout, bias=False)
        self.groups = nn.ModuleList(
            QuantizedExperts(len(m), hidden_size, expert_hidden, unbiased, fmt, gate_up_pieces, device=device)
            for fmt, m in zip(self.formats, self.members, strict=True)
        )
        if layout.bias:
            up_width = 2 * expert_hidden if layout.gated else expert_hidden
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, up_width, device=device))
            self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, hidden_size, device=device))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None

    @classmethod
    def like(cls, experts: nn.Module, formats_E: list[Format], gate_up_pieces: int = 1) -> MixedExperts:
        """The mixed counterpart of an ExpertWeights, on its device, its weights quantized unless meta."""
        w = experts.gate_up_proj
        mixed = cls(experts.hidden_size, experts.expert_hidden, experts.layout, formats_E, gate_up_pieces, w.device)
        if experts.layout.bias:
            mixed.gate_up_proj_bias = nn.Parameter(experts.gate_up_proj_bias.detach().clone())
            mixed.down_proj_bias = nn.Parameter(experts.down_proj_bias.detach().clone())
        if not w.is_meta:
            for base in BASES:
                weight = getattr(experts, base).detach()
                weight = weight.transpose(1, 2) if experts.layout.transposed else weight
                for group, members in zip(mixed.groups, mixed.members, strict=True):
                    group.store(base, weight[members])
        return mixed

    @property
    def int8_activations(self) -> bool:
        return all(g.int8_activations for g in self.groups)

    def held_weights(self) -> list[str]:
        return list(BASES)

    def group_index(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, slot) of each expert id (the table made once per device: decode asks every token)."""
        place = self.__dict__.get("_place")
        if place is None or place.device != ids.device:  # not a buffer: materialising a meta model zeroes buffers
            place = self.__dict__["_place"] = torch.tensor(self.place_E, device=ids.device)
        return place[ids, 0], place[ids, 1]

    def dequantized(self, base: str, dtype: torch.dtype, index: torch.Tensor | None = None) -> torch.Tensor:
        """The weights `base` of the experts `index` (all by default), output-major, in dtype."""
        ids = torch.arange(self.num_experts) if index is None else index.reshape(-1).long()
        group, slot = self.group_index(ids)
        shape = self.groups[0].piece_shape(base)[1:]
        out = torch.empty(ids.numel(), *shape, dtype=dtype)
        for g, experts in enumerate(self.groups):
            rows = (group == g).nonzero().flatten()
            if rows.numel():
                out[rows] = experts.dequantized(base, dtype, slot[rows])
        return out

    def expert_params(self) -> int:
        """Parameters of one expert (as the float model counts them)."""
        return self.groups[0].expert_params() + sum(p[0].numel() for p in self.parameters(recurse=False))

    def extra_repr(self) -> str:
        counts = ", ".join(f"{f.name} x{len(m)}" for f, m in zip(self.formats, self.members, strict=True))
        return f"experts={self.num_experts}, layout={self.layout.describe()}, formats: {counts}"
