"""compressed-tensors "pack-quantized" integer weights (Kimi-K2-Thinking / K2.5 ship their routed experts as INT4,
symmetric, group 32; moekit quantize writes INT8 and asymmetric INT4 in the same layout):
weight_packed int32 [out, ceil(in * bits / 32)], 32 / bits values per word (element i of a word at bits
bits * i, each stored as the signed value + 2^(bits - 1)); weight_scale [out, ceil(in / group)] (bf16 in the
files); asymmetric: weight_zero_point, the signed zero points packed the same way along the output dimension
[ceil(out * bits / 32), groups]; weight_shape [out, in]. The real weight (q - zero_point) * scale.
Leading (expert) axes are allowed: [..., out, in]. As compressed-tensors computes them: symmetric scales are the
group's largest magnitude over 2^bits / 2 - 1/2, asymmetric ones the range (including 0) over 2^bits - 1."""

from __future__ import annotations

import torch

from moekit.quant.checks import checked_scales

GROUP = 32


def _per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits} is invalid: allowed 2, 4 or 8")
    return 32 // bits


def unpack(packed_OW: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """The signed values [..., out, width] (int32) of packed words [..., out, words]."""
    shifts = torch.arange(_per_word(bits), dtype=torch.int32, device=packed_OW.device) * bits
    codes = (packed_OW.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift: the mask keeps the code
    return codes.flatten(-2)[..., :width] - (1 << (bits - 1))


def pack(q_OI: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values [..., out, in] in [-2^(bits-1), 2^(bits-1)) packed into int32 words [..., out, words] (a ragged
    last word padded with zeros)."""
    per_word = _per_word(bits)
    codes = (q_OI.long() + (1 << (bits - 1))) & ((1 << bits) - 1)
    codes = torch.nn.functional.pad(codes, (0, -q_OI.shape[-1] % per_word))  # code 0, as compressed-tensors pads
    shifts = torch.arange(per_word, dtype=torch.int64, device=q_OI.device) * bits
    words = (codes.unflatten(-1, (-1, per_word)) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the word's bits as int32


def _zero_points(packed_zp: torch.Tensor, bits: int, out: int) -> torch.Tensor:
    return unpack(packed_zp.transpose(-1, -2), bits, out).transpose(-1, -2)


def dequantize(
    packed_OW: torch.Tensor,
    scale_OG: torch.Tensor,
    shape: tuple[int, int] | None = None,
    name: str = "weight",
    group: int = GROUP,
    bits: int = 4,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fp32 weight [..., out, in] of packed words, group scales and (asymmetric) packed zero points; a
    ValueError naming `name` where the packing, the scales or weight_shape (the last two sides) do not agree."""
    if packed_OW.dtype != torch.int32:
        raise ValueError(f"{name}: weight_packed must be int32, got {packed_OW.dtype}")
    per_word = _per_word(bits)
    out, width = packed_OW.shape[-2], packed_OW.shape[-1] * per_word
    if shape is not None and (shape[0] != out or not 0 < shape[1] <= width or width - shape[1] >= per_word):
        raise ValueError(f"{name}: weight_shape {list(shape)} does not fit weight_packed {list(packed_OW.shape)}")
    width = shape[1] if shape is not None else width
    lead = tuple(packed_OW.shape[:-2])
    expected = (*lead, out, -(-width // group))
    scale = checked_scales(name, "weight_scale", scale_OG, expected, (*lead, out, width), f"groups of {group}")
    q = unpack(packed_OW, bits, width)
    if zero_point is not None:
        zp_shape = (*lead, -(-out // per_word), expected[-1])
        if tuple(zero_point.shape) != zp_shape or zero_point.dtype != torch.int32:
            raise ValueError(
                f"{name}: weight_zero_point {zero_point.dtype} {list(zero_point.shape)} does not fit: allowed int32 "
                f"{list(zp_shape)}"
            )
        q = q - _zero_points(zero_point, bits, out).repeat_interleave(group, -1)[..., :width]
    return q.float() * scale.repeat_interleave(group, -1)[..., :width]


def quantize(
    w_OI: torch.Tensor, group: int = GROUP, bits: int = 4, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(weight_packed, weight_scale fp32, packed zero points or None) of a weight [..., out, in]."""
    *lead, out, width = w_OI.shape
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups_OGK = torch.nn.functional.pad(w_OI.float(), (0, -width % group)).unflatten(-1, (-1, group))
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale_OG = (groups_OGK.abs().amax(-1) / ((hi - lo) / 2)).clamp_min(tiny)
        zp_OG = torch.zeros_like(scale_OG, dtype=torch.int32)
    else:
        low, high = groups_OGK.amin(-1).clamp(max=0), groups_OGK.amax(-1).clamp(min=0)
        scale_OG = ((high - low) / (hi - lo)).clamp_min(tiny)
        zp_OG = torch.round(lo - low / scale_OG).clamp(lo, hi).to(torch.int32)
    q = torch.round(groups_OGK / scale_OG.unsqueeze(-1)) + zp_OG.unsqueeze(-1)
    q = q.clamp(lo, hi).to(torch.int32).flatten(-2)[..., :width]
    packed = pack(q, bits)
    zp = None if symmetric else pack(zp_OG.transpose(-1, -2), bits).transpose(-1, -2).contiguous()
    return packed, scale_OG, zp
