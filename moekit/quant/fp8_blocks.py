"""FP8 block quantization as DeepSeek-V3, Kimi-K2 and the Qwen3/GLM "-FP8" repositories ship it (quant_method =
"fp8", fmt = "e4m3", weight_block_size = [128, 128]): a weight W [out, in] in float8_e4m3fn and W_scale_inv (fp32)
[ceil(out / 128), ceil(in / 128)], one scale per block, the real weight W[i, j] * scale_inv[i // 128, j // 128];
sides that are not multiples of 128 end in ragged blocks (DeepSeek's kv_a_proj_with_mqa is 576 x 7168). 8 bits per
weight plus 4 bytes per block (8.002 bits)."""

from __future__ import annotations

import math

import torch

from moekit.quant.checks import checked_scales

BLOCK = (128, 128)
E4M3_MAX = 448.0


def _expand(scale_inv_GH: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape[-2:]
    return scale_inv_GH.repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]


def dequantize(
    w_OI: torch.Tensor, scale_inv_GH: torch.Tensor, block: tuple[int, int] = BLOCK, name: str = "weight"
) -> torch.Tensor:
    """The fp32 weight of an e4m3 weight [..., out, in] and its block scales [..., ceil(out/b0), ceil(in/b1)]; a
    ValueError naming `name` for a scale grid that does not fit, other dtypes, or non-finite scales."""
    if w_OI.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}: FP8 block weights must be float8_e4m3fn, got {w_OI.dtype}")
    grid = (*w_OI.shape[:-2], math.ceil(w_OI.shape[-2] / block[0]), math.ceil(w_OI.shape[-1] / block[1]))
    grouping = f"{block[0]} x {block[1]} blocks"
    scale = checked_scales(name, "scale_inv", scale_inv_GH, grid, w_OI.shape, grouping)
    return w_OI.float() * _expand(scale, w_OI.shape, block)


def quantize(
    w_OI: torch.Tensor, block: tuple[int, int] = BLOCK, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale_inv) of a weight [..., out, in]: each block's scale its largest magnitude over 448
    (ragged blocks as if zero-padded); ue8m0: scales rounded up to powers of two (DeepSeek-V3.1's scale_fmt)."""
    w = w_OI.float()
    rows, cols = w.shape[-2:]
    pad = (0, -cols % block[1], 0, -rows % block[0])
    padded = torch.nn.functional.pad(w, pad)
    g, h = padded.shape[-2] // block[0], padded.shape[-1] // block[1]
    blocks = padded.reshape(*w.shape[:-2], g, block[0], h, block[1])
    scale_GH = (blocks.abs().amax((-3, -1)) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    if ue8m0:
        scale_GH = torch.exp2(torch.ceil(torch.log2(scale_GH)))
    q = (w / _expand(scale_GH, w.shape, block)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale_GH
