"""MXFP4 as gpt-oss ships its experts (quantization_config.quant_method = "mxfp4"): per weight row, groups of 32
consecutive input-dimension values, each an E2M1 code (4 bits: bit 3 the sign, then +0, 0.5, 1, 1.5, 2, 3, 4, 6),
two per byte (element 2j in the low nibble of byte j, 2j + 1 in the high one), and one UE8M0 scale byte per group
meaning 2^(s - 127): 16 + 1 bytes per 32 weights, 4.25 bits per weight.

blocks_RG16: uint8 [..., rows, groups, 16]; scales_RG: uint8 [..., rows, groups]; the weight: [..., rows, 32 * groups].
(R rows, G groups, K the 32 values of a group.)"""

from __future__ import annotations

import torch

GROUP = 32
BITS_PER_WEIGHT = (GROUP // 2 + 1) * 8 / GROUP  # 4.25
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_NAN_SCALE = 255  # UE8M0's NaN


def dequantize(blocks_RG16: torch.Tensor, scales_RG: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """The fp32 weight [..., rows, groups * 32] of MXFP4 blocks and scales; a ValueError naming `name` for shapes that
    do not match, other dtypes, or NaN scales."""
    if blocks_RG16.dtype != torch.uint8 or scales_RG.dtype != torch.uint8:
        raise ValueError(
            f"{name}: MXFP4 blocks and scales must be uint8, got {blocks_RG16.dtype} and {scales_RG.dtype}"
        )
    if blocks_RG16.shape[-1] != GROUP // 2 or blocks_RG16.shape[:-1] != scales_RG.shape:
        raise ValueError(
            f"{name}: MXFP4 blocks {list(blocks_RG16.shape)} and scales {list(scales_RG.shape)} do not match: "
            f"allowed blocks [..., rows, groups, 16] with scales [..., rows, groups]"
        )
    if bool((scales_RG == _NAN_SCALE).any()):
        raise ValueError(f"{name}: MXFP4 scale byte 255 (NaN) found: allowed 0-254")
    table = torch.tensor(E2M1, dtype=torch.float32)
    low, high = table[(blocks_RG16 & 0x0F).long()], table[(blocks_RG16 >> 4).long()]
    values_RGK = torch.stack((low, high), dim=-1).flatten(-2)  # element 2j, then 2j + 1
    scaled = torch.ldexp(values_RGK, scales_RG.to(torch.int32).unsqueeze(-1) - 127)
    return scaled.flatten(-2)


def quantize(w_RI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of a weight [..., rows, in] (in a multiple of 32): each group's scale the smallest power of two
    that brings its largest magnitude within 6, each value rounded to the nearest E2M1 code (ties to the even code)."""
    if w_RI.shape[-1] % GROUP:
        raise ValueError(f"weight input width {w_RI.shape[-1]} is invalid for MXFP4: allowed a multiple of {GROUP}")
    w_RGK = w_RI.float().reshape(*w_RI.shape[:-1], -1, GROUP)
    amax_RG = w_RGK.abs().amax(-1)
    exponent_RG = torch.ceil(torch.log2(amax_RG.clamp_min(2.0**-127) / 6.0)).clamp(-127, 127).to(torch.int32)
    x_RGK = torch.ldexp(w_RGK, -exponent_RG.unsqueeze(-1))
    magnitudes = torch.tensor(E2M1[:8])
    code_RGK = (x_RGK.abs().unsqueeze(-1) - magnitudes).abs().argmin(-1)  # nearest; the first (even) code on a tie
    code_RGK = code_RGK | ((x_RGK < 0) & (code_RGK > 0)).long() << 3
    pairs = code_RGK.to(torch.uint8).reshape(*code_RGK.shape[:-1], GROUP // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks.contiguous(), (exponent_RG + 127).to(torch.uint8)
