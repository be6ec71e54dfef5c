"""compressed-tensors "pack-quantized" INT4, symmetric, as Kimi-K2-Thinking / K2.5 ship their routed experts:
weight_packed int32 [out, in / 8] holding 8 values per word (element i of a word at bits 4i, each stored as the
signed value + 8), weight_scale [out, in / group] (bf16 in the files), group 32 along the input dimension, and
weight_shape [out, in]; the real weight (nibble - 8) * scale. 4 bits per weight plus 16 bits per group (4.5 bits).
Leading (expert) axes are allowed: [..., out, in]."""

from __future__ import annotations

import torch

from moekit.quant.checks import checked_scales

GROUP = 32
PER_WORD = 8


def dequantize(
    packed_OW: torch.Tensor,
    scale_OG: torch.Tensor,
    shape: tuple[int, int] | None = None,
    name: str = "weight",
    group: int = GROUP,
) -> torch.Tensor:
    """The fp32 weight [..., out, in] of packed int4 words and group scales; a ValueError naming `name` where the
    packing, the scales or weight_shape (the last two sides) do not agree."""
    if packed_OW.dtype != torch.int32:
        raise ValueError(f"{name}: weight_packed must be int32, got {packed_OW.dtype}")
    out, width = packed_OW.shape[-2], packed_OW.shape[-1] * PER_WORD
    if shape is not None and (shape[0] != out or not 0 < shape[1] <= width or width - shape[1] >= PER_WORD):
        raise ValueError(f"{name}: weight_shape {list(shape)} does not fit weight_packed {list(packed_OW.shape)}")
    width = shape[1] if shape is not None else width
    lead = tuple(packed_OW.shape[:-2])
    expected = (*lead, out, -(-width // group))
    scale = checked_scales(name, "weight_scale", scale_OG, expected, (*lead, out, width), f"groups of {group}")
    shifts = torch.arange(PER_WORD, dtype=torch.int32, device=packed_OW.device) * 4
    nibbles = (packed_OW.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift: the mask keeps the nibble
    values_OI = (nibbles.flatten(-2)[..., :width] - 8).float()
    return values_OI * scale.repeat_interleave(group, -1)[..., :width]


def quantize(w_OI: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_packed, weight_scale fp32) of a weight [..., out, in]: each group's scale its largest magnitude over 7,
    values rounded to the nearest integer in [-8, 7]."""
    *lead, out, width = w_OI.shape
    w = torch.nn.functional.pad(w_OI.float(), (0, -width % group))
    groups_OGK = w.unflatten(-1, (-1, group))
    scale_OG = (groups_OGK.abs().amax(-1) / 7.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(groups_OGK / scale_OG.unsqueeze(-1)).clamp(-8, 7).to(torch.int32) + 8
    words = -(-width // PER_WORD)
    q = q.flatten(-2)[..., : words * PER_WORD].unflatten(-1, (words, PER_WORD))  # groups cover whole words
    shifts = torch.arange(PER_WORD, dtype=torch.int32) * 4
    packed = (q.long() << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the word's bits as int32
    return packed, scale_OG
