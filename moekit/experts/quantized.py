"""Stacked expert weights held quantized: the parts of gate_up_proj [E, 2F, D] (or [E, F, D]) and down_proj
[E, D, F] under the checkpoint's names (gate_up_proj_blocks / _scales for gpt-oss's MXFP4, gate_up_proj +
gate_up_proj_scale_inv for FP8 blocks, ...), always output-major (rows = output features, the layout every
quantized format groups along), biases as float parameters. Backends dequantize only the experts a call uses."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from moekit.experts.layout import ExpertLayout
from moekit.quant.formats import Format
from moekit.quant.held import QuantizedModule


class QuantizedExperts(QuantizedModule):
    """gate_up_pieces: 2 where a per-expert checkpoint quantized gate and up apart (each [F, D])."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        expert_hidden: int,
        layout: ExpertLayout,
        fmt: Format,
        gate_up_pieces: int = 1,
        device=None,
    ):
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_hidden = num_experts, hidden_size, expert_hidden
        self.layout, self.fmt = replace(layout, transposed=False), fmt
        up_width = 2 * expert_hidden if layout.gated else expert_hidden
        self.hold("gate_up_proj", (num_experts, up_width, hidden_size), gate_up_pieces, device=device)
        self.hold("down_proj", (num_experts, hidden_size, expert_hidden), device=device)
        if layout.bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, up_width, device=device))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size, device=device))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None

    @classmethod
    def like(cls, experts: nn.Module, fmt: Format, gate_up_pieces: int = 1) -> QuantizedExperts:
        """The quantized counterpart of an ExpertWeights, on its device, its weights quantized unless meta."""
        w = experts.gate_up_proj
        q = cls(
            experts.num_experts,
            experts.hidden_size,
            experts.expert_hidden,
            experts.layout,
            fmt,
            gate_up_pieces,
            device=w.device,
        )
        if experts.layout.bias:
            q.gate_up_proj_bias = nn.Parameter(experts.gate_up_proj_bias.detach().clone())
            q.down_proj_bias = nn.Parameter(experts.down_proj_bias.detach().clone())
        if not w.is_meta:
            for base in ("gate_up_proj", "down_proj"):
                weight = getattr(experts, base).detach()
                q.store(base, weight.transpose(1, 2) if experts.layout.transposed else weight)
        return q

    def expert_params(self) -> int:
        """Parameters of one expert (as the float model counts them)."""
        weights = sum(math.prod(shape[1:]) for shape, _ in self._held.values())
        return weights + sum(p[0].numel() for p in self.parameters(recurse=False))

    def extra_repr(self) -> str:
        e, d, f = self.num_experts, self.hidden_size, self.expert_hidden
        return f"experts={e}, hidden={d}, expert_hidden={f}, layout={self.layout.describe()}, format={self.fmt.name}"
