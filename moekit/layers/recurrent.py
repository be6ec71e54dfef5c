"""What the recurrent token mixers (Gated DeltaNet, Mamba-1, Mamba-2) share: the padding of a prompt, and their
short causal depthwise convolution, whose last kernel - 1 inputs they keep as part of their state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def recurrent_inputs(inputs, layer: int, x_BTD: torch.Tensor):
    """(x with a padded prompt's padding zeroed, the layer's saved state or None, the padding [B, T, 1] (1 = real
    token) or None): on a padded prompt (no state yet) padding must write nothing."""
    saved = inputs.cache.state(layer) if inputs.cache is not None else None
    if inputs.token_mask_BT is None or saved is not None:
        return x_BTD, saved, None
    padding_BT1 = inputs.token_mask_BT[:, :, None].to(x_BTD.dtype)
    return x_BTD * padding_BT1, saved, padding_BT1


def short_conv(x_BCT: torch.Tensor, conv: nn.Conv1d, saved: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of the causal depthwise convolution of x after the kept inputs (the saved state's first part; zeros on a
    first call); (its output [B, C, T], the last kernel - 1 inputs to keep)."""
    kernel = conv.kernel_size[0]
    history_BCK = saved[0] if saved is not None else None
    if history_BCK is None:
        history_BCK = x_BCT.new_zeros(x_BCT.shape[0], x_BCT.shape[1], kernel - 1)
    padded_BCT = torch.cat([history_BCK, x_BCT], dim=-1)
    out_BCT = F.silu(F.conv1d(padded_BCT, conv.weight, conv.bias, groups=x_BCT.shape[1]))
    return out_BCT, padded_BCT[:, :, -(kernel - 1) :].contiguous()
