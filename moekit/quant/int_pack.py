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


BITS = (2, 3, 4, 8)


def words(values: int, bits: int) -> int:
    """int32 words that hold `values` codes of `bits` bits, packed densely (a code may straddle two words)."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is invalid: allowed {', '.join(map(str, BITS))}")
    return -(-values * bits // 32)


def unpack(packed_OW: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """The signed values [..., out, width] (int32) of packed words [..., out, words]: code i at bit i * bits of the
    little-endian stream of words."""
    words(width, bits)
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # no code straddles two words
        shifts = torch.arange(32 // bits, dtype=torch.int32, device=packed_OW.device) * bits
        codes = (packed_OW.unsqueeze(-1) >> shifts) & mask  # arithmetic shift: the mask keeps the code
        return codes.flatten(-2)[..., :width] - (1 << (bits - 1))
    stream = torch.nn.functional.pad(packed_OW.long() & 0xFFFFFFFF, (0, 1))  # a zero word past the end
    at = torch.arange(width, device=packed_OW.device) * bits
    pairs = stream[..., at // 32] | (stream[..., at // 32 + 1] << 32)
    return ((pairs >> (at % 32)) & mask).to(torch.int32) - (1 << (bits - 1))


def pack(q_OI: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values [..., out, in] in [-2^(bits-1), 2^(bits-1)) packed densely into int32 words [..., out, words]
    (code i at bit i * bits; the last word's unused bits zero), as compressed-tensors packs them."""
    n = q_OI.shape[-1]
    count = words(n, bits)
    codes = (q_OI.long() + (1 << (bits - 1))) & ((1 << bits) - 1)
    at = torch.arange(n, dtype=torch.int64, device=q_OI.device) * bits
    shifted = codes << (at % 32)  # at most 39 bits: the part past 32 goes to the next word
    stream = torch.zeros((*q_OI.shape[:-1], count + 1), dtype=torch.int64, device=q_OI.device)
    index = (at // 32).expand_as(codes)
    stream.scatter_add_(-1, index, shifted & 0xFFFFFFFF)
    stream.scatter_add_(-1, index + 1, shifted >> 32)
    stream = stream[..., :count]
    return torch.where(stream >= 2**31, stream - 2**32, stream).to(torch.int32)  # the word's bits as int32


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
    out, width = packed_OW.shape[-2], packed_OW.shape[-1] * 32 // bits
    if shape is not None and (shape[0] != out or words(shape[1], bits) != packed_OW.shape[-1]):
        raise ValueError(f"{name}: weight_shape {list(shape)} does not fit weight_packed {list(packed_OW.shape)}")
    width = shape[1] if shape is not None else width
    lead = tuple(packed_OW.shape[:-2])
    expected = (*lead, out, -(-width // group))
    scale = checked_scales(name, "weight_scale", scale_OG, expected, (*lead, out, width), f"groups of {group}")
    q = unpack(packed_OW, bits, width)
    if zero_point is not None:
        zp_shape = (*lead, words(out, bits), expected[-1])
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
