"""Rotary position embedding with the context-extension schemes of the published MoE families (yarn, llama3,
linear), in the split-half form (Llama, Mixtral, Qwen) or the interleaved-pair form (DeepSeek, Llama 4)."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.config.attention import RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(
    dim: int, theta: float, scaling: RopeScaling | None, long: bool = False
) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention factor multiplying cos and sin); long: longrope's long-context regime.
    Always computed on the CPU (also inside a meta-device build, where arange would pull in torch's
    decomposition machinery)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if scaling is None or scaling.type == "default":
        return inv_freq, 1.0
    if scaling.type == "longrope":
        factors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32, device="cpu")
        if factors.numel() != inv_freq.numel():
            raise ValueError(f"rope_scaling has {factors.numel()} factors, the rotary width needs {inv_freq.numel()}")
        mscale = scaling.long_mscale if long else scaling.short_mscale
        if mscale is None:
            orig = scaling.original_max_position
            mscale = 1.0 if scaling.factor <= 1 else math.sqrt(1 + math.log(scaling.factor) / math.log(orig))
        return inv_freq / factors, float(mscale)
    if scaling.type == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.type == "llama3":
        old = scaling.original_max_position
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate the low frequencies, keep the high ones, ramp in between
    factor = scaling.factor
    if scaling.mscale and scaling.mscale_all_dim:
        attention_factor = yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, float(attention_factor)


def softmax_scale(head_dim: int, scaling: RopeScaling | None) -> float:
    """1/sqrt(head_dim), times DeepSeek's yarn correction mscale(factor, mscale_all_dim)^2 when it applies."""
    scale = head_dim**-0.5
    if scaling is not None and scaling.type == "yarn" and scaling.mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None):
        super().__init__()
        self.scaling = scaling
        self.longrope = scaling is not None and scaling.type == "longrope"
        inv_freq, self.attention_factor = rope_frequencies(dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self.longrope:
            inv_freq_long, self.attention_factor_long = rope_frequencies(dim, theta, scaling, long=True)
            self.register_buffer("inv_freq_long", inv_freq_long, persistent=False)

    def frequencies(self, length: int) -> tuple[torch.Tensor, float]:
        """inv_freq [dim / 2] and the attention factor for a sequence of `length` positions (longrope switches to
        its long factors past the original context)."""
        if self.longrope and length > self.scaling.original_max_position:
            return self.inv_freq_long, self.attention_factor_long
        return self.inv_freq, self.attention_factor

    def forward(
        self, positions_BT: torch.Tensor, dtype: torch.dtype, per_row: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, dim] (each frequency twice: [f0..f_{n-1}, f0..f_{n-1}]). per_row: longrope picks
        each row's factors by that row's own length (independent sequences batched together), not the batch's."""
        if per_row and self.longrope and positions_BT.shape[0] > 1:
            rows = [self(row_1T, dtype) for row_1T in positions_BT.split(1)]
            return torch.cat([cos for cos, _ in rows]), torch.cat([sin for _, sin in rows])
        length = int(positions_BT.max()) + 1 if self.longrope and positions_BT.numel() else 0  # no sync otherwise
        inv_freq, factor = self.frequencies(length)
        freqs_BTH = positions_BT.float().unsqueeze(-1) * inv_freq.float()
        emb = torch.cat((freqs_BTH, freqs_BTH), dim=-1)
        return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor, interleave: bool = False
) -> torch.Tensor:
    """Rotate x by the positions' angles. interleave: pairs (x0, x1), (x2, x3)... are rotated together and the
    result is laid out as [evens, odds] (what DeepSeek's and Llama 4's weights expect after de-interleaving)."""
    cos, sin = cos_BTd.unsqueeze(1), sin_BTd.unsqueeze(1)
    if interleave:
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        x1, x2 = x_BHTd[..., 0::2], x_BHTd[..., 1::2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return x_BHTd * cos + rotate_half(x_BHTd) * sin
