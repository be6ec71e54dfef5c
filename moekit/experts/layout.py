"""How expert weights are laid out and what the expert FFN computes: explicit metadata, never guessed from shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from moekit._validate import check_choice, check_float, fail
from moekit.kernels.swiglu import swiglu

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu", "limited_swiglu")
CLAMPED = ("clamped_swiglu", "limited_swiglu")


@dataclass(frozen=True)
class ExpertLayout:
    """gated        gate and up projections (GLU: act(gate) * up); otherwise a plain up -> act -> down MLP.
    gate_up       how gate and up share the stacked projection: 'concatenated' (all gate rows, then all up rows) or
                  'interleaved' (gate0, up0, gate1, up1, ...: GPT-OSS).
    transposed    weights stored [E, in, out] instead of [E, out, in].
    bias          biases on both projections.
    activation    silu (SwiGLU), gelu, gelu_tanh, relu, clamped_swiglu (GPT-OSS: gate clamped above at limit, up
                  clamped to +-limit, out = (up + 1) * gate * sigmoid(alpha * gate)) or limited_swiglu (DeepSeek-V4:
                  the same clamps, out = silu(gate) * up).
    """

    gated: bool = True
    gate_up: Literal["concatenated", "interleaved"] = "concatenated"
    transposed: bool = False
    bias: bool = False
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self) -> None:
        check_choice("gate_up", self.gate_up, ("concatenated", "interleaved"))
        check_choice("activation", self.activation, ACTIVATIONS)
        if self.activation in CLAMPED and not self.gated:
            fail("activation", self.activation, f"a gated layout (gated=True) for {self.activation}")
        check_float("swiglu_alpha", self.swiglu_alpha, 0.0, lo_open=True)
        check_float("swiglu_limit", self.swiglu_limit, 0.0, lo_open=True)

    def describe(self) -> str:
        glu = {"silu": "SwiGLU", "gelu": "GeGLU", "gelu_tanh": "GeGLU(tanh)", "relu": "ReGLU"}
        if self.activation == "clamped_swiglu":
            name = f"clamped SwiGLU (alpha {self.swiglu_alpha}, limit {self.swiglu_limit})"
        elif self.activation == "limited_swiglu":
            name = f"SwiGLU limited to {self.swiglu_limit}"
        else:
            name = glu[self.activation] if self.gated else f"{self.activation} MLP"
        extras = [self.gate_up] if self.gated else []
        extras += ["transposed"] * self.transposed + ["bias"] * self.bias
        return f"{name} [{', '.join(extras)}]" if extras else name


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def apply_activation(h_SX: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """[S, 2F] gate/up pre-activations (or [S, F] ungated) -> [S, F]."""
    if not layout.gated:
        return _act(h_SX, layout.activation)
    if layout.gate_up == "interleaved":
        gate, up = h_SX[..., 0::2], h_SX[..., 1::2]
    else:
        if layout.activation == "silu":  # SwiGLU: one pass each way where moekit's kernel takes the rows
            fused = swiglu(h_SX)
            if fused is not None:
                return fused
        gate, up = h_SX.chunk(2, dim=-1)
    return glu(gate, up, layout)


def glu(gate: torch.Tensor, up: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """act(gate) * up, or GPT-OSS's clamped form, or DeepSeek-V4's limited SwiGLU."""
    if layout.activation in CLAMPED:
        gate = gate.clamp(max=layout.swiglu_limit)
        up = up.clamp(-layout.swiglu_limit, layout.swiglu_limit)
        if layout.activation == "limited_swiglu":
            return F.silu(gate) * up
        return (up + 1) * gate * torch.sigmoid(gate * layout.swiglu_alpha)
    return _act(gate, layout.activation) * up
