"""The Python face of moekit's kernels that read quantized weights (csrc/quant_gemv.cpp): one-row products of a
token's k experts, or of a linear layer, straight from the packed bytes. The activations are quantized to int8 per
group of 32 (scale amax / 127, round half to even) once per row; `quantized_activation` is that rounding in torch,
for the dequantize-then-fp32 reference the kernel is tested against.

Covered: compressed-tensors pack-quantized INT8 / INT4 (symmetric or asymmetric) with bf16 scales and group 32,
and MXFP4 (also as DeepSeek-V4 packs it), for input widths that are multiples of 32; FP8 e4m3 blocks, any shape
(there the activations stay fp32: no integer product of fp8 values exists; scales other than fp32, such as
DeepSeek-V4's UE8M0 bytes, are read from an fp32 copy made once). fp32 activations on the CPU. Elsewhere the
wrapper returns None and the caller dequantizes the weights it uses (backends say so once)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moekit.kernels.build import kernel_taking
from moekit.quant.formats import Fp8Blocks, IntPacked, Mxfp4, PackedFp4

if TYPE_CHECKING:  # the quantized modules dequantize through this module
    from moekit.quant.held import QuantizedModule

GROUP = 32
_INT8, _INT4, _MXFP4, _FP8 = "int8", "int4", "mxfp4", "fp8"
_FORMAT_CODES = {_INT8: 0, _INT4: 1, _MXFP4: 2, _FP8: 3}  # csrc/kernels.h's QuantWeights


def quantized_activation(x_RI: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels quantize it: per group of 32, int8 values times amax / 127."""
    groups = x_RI.float().unflatten(-1, (-1, GROUP))
    d = groups.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(groups / torch.where(d > 0, d, 1.0)), 0.0)
    return (q * d).flatten(-2)


def _code(module: QuantizedModule, base: str) -> int | None:
    fmt = module.fmt
    shape, pieces = module.held(base)
    if isinstance(fmt, Fp8Blocks):  # fp32 activations: any width
        return _FP8
    if shape[-1] % GROUP:
        return None
    if isinstance(fmt, Mxfp4):
        return _MXFP4
    if not isinstance(fmt, IntPacked) or fmt.group != GROUP or fmt.scale_dtype != torch.bfloat16:
        return None
    if not fmt.symmetric and pieces > 1 and (shape[-2] // pieces) % (32 // fmt.bits):
        return None  # zero points packed per piece, not continuing across the pieces
    return {8: _INT8, 4: _INT4}.get(fmt.bits)


def covers(module: QuantizedModule, base: str) -> bool:
    """Whether the kernel reads weight `base` of module (its format and shape)."""
    return _code(module, base) is not None


def quant_weights(module: QuantizedModule, base: str):
    """The kernel's QuantWeights of weight `base` of module (a linear layer's as a stack of one), or None where the
    kernel does not take it (format, shape, no kernel here); built once per module and weight (it views the
    buffers, so in-place changes show, but to FP8 scales that are not fp32; moving the module clears it)."""
    cache = module.kernel_cache()
    if base not in cache:
        cache[base] = _build_weights(module, base)
    return cache[base]


def _build_weights(module: QuantizedModule, base: str):
    code = _code(module, base)
    kernel = kernel_taking() if code is not None else None
    parts = module.parts(base)
    if kernel is None or not all(p.is_cpu for p in parts.values()):
        return None
    (shape, pieces), fmt = module.held(base), module.fmt
    block, zero_points = (1, 1), None
    if code == _FP8:
        codes, scales, block = parts[""].view(torch.uint8), parts["_scale_inv"].float(), fmt.block
    elif code == _MXFP4:
        parts = fmt.as_mxfp4(parts) if isinstance(fmt, PackedFp4) else parts
        codes, scales = parts["_blocks"].flatten(-2), parts["_scales"]
    else:
        codes, scales, zero_points = parts["_packed"].view(torch.uint8), parts["_scale"], parts.get("_zero_point")
    if len(shape) == 2:
        codes, scales = codes.unsqueeze(0), scales.unsqueeze(0)
        zero_points = zero_points.unsqueeze(0) if zero_points is not None else None
    return kernel.QuantWeights(
        format=_FORMAT_CODES[code],
        codes=codes,
        scales=scales,
        zero_points=zero_points if zero_points is not None else torch.empty(0, dtype=torch.int32),
        block_rows=block[0],
        block_cols=block[1],
        pieces=pieces,
        cols=shape[-1],
    )


def quant_gemv(
    module: QuantizedModule, base: str, ids_R: torch.Tensor | None, x_RI: torch.Tensor
) -> torch.Tensor | None:
    """y_RO[r] = dequantized(weight base of expert ids_R[r]) @ x_RI[r] (x_RI may be one row for all; ids None: a
    linear layer's own weight), or None where the kernel does not take it."""
    if not module.int8_activations or x_RI.dtype != torch.float32 or not x_RI.is_cpu or torch.is_grad_enabled():
        return None
    weights = quant_weights(module, base)
    if weights is None:
        return None
    if ids_R is None:
        ids_R = torch.zeros(x_RI.shape[0], dtype=torch.long)
    y_RO = x_RI.new_empty(ids_R.numel(), weights.rows)
    x = x_RI.contiguous() if x_RI.stride(0) != 0 else x_RI[:1].contiguous()
    kernel_taking(x).quant_gemv(weights, ids_R.contiguous(), x, y_RO, torch.get_num_threads())
    return y_RO


def dequantize(module: QuantizedModule, base: str, index: torch.Tensor | None = None) -> torch.Tensor | None:
    """The fp32 weight `base` of module (index: of those experts only) as moekit.quant computes it, bit for bit,
    from the kernel (about 5x faster than torch's unpacking), or None where the kernel does not take it."""
    weights = quant_weights(module, base)
    if weights is None:
        return None
    shape, _ = module.held(base)
    ids = torch.zeros(1, dtype=torch.long) if len(shape) == 2 else index
    ids = torch.arange(shape[0]) if ids is None else ids.reshape(-1).long().contiguous()
    out = torch.empty(ids.numel(), weights.rows, weights.cols)
    kernel_taking().quant_dequantize(weights, ids, out, torch.get_num_threads())
    return out[0] if len(shape) == 2 else out
