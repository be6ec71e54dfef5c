"""The Python face of moekit's kernels that read quantized weights (csrc/quant_gemv.cpp): one-row products of a
token's k experts, or of a linear layer, straight from the packed bytes. The activations are quantized to int8 per
group of 32 (scale amax / 127, round half to even) once per row; `quantized_activation` is that rounding in torch,
for the dequantize-then-fp32 reference the kernel is tested against.

Covered: compressed-tensors pack-quantized INT8 / INT4 (symmetric or asymmetric) with bf16 scales and group 32,
and MXFP4, for input widths that are multiples of 32; FP8 e4m3 blocks with fp32 scales, any shape (there the
activations stay fp32: no integer product of fp8 values exists). fp32 activations on the CPU. Elsewhere the
wrapper returns None and the caller dequantizes the weights it uses (backends say so once)."""

from __future__ import annotations

import torch

from moekit.kernels.build import kernel_taking
from moekit.quant.formats import Fp8Blocks, IntPacked, Mxfp4
from moekit.quant.held import QuantizedModule

GROUP = 32
_INT8, _INT4, _MXFP4, _FP8 = 0, 1, 2, "fp8"


def quantized_activation(x_RI: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels quantize it: per group of 32, int8 values times amax / 127."""
    groups = x_RI.float().unflatten(-1, (-1, GROUP))
    d = groups.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(groups / torch.where(d > 0, d, 1.0)), 0.0)
    return (q * d).flatten(-2)


def _code(module: QuantizedModule, base: str) -> int | None:
    fmt = module.fmt
    shape, pieces = module._held[base]
    if isinstance(fmt, Fp8Blocks):  # fp32 activations: any width
        return _FP8 if fmt.scale_dtype == torch.float32 else None
    if shape[-1] % GROUP:
        return None
    if isinstance(fmt, Mxfp4):
        return _MXFP4
    if not isinstance(fmt, IntPacked) or fmt.group != GROUP or fmt.scale_dtype != torch.bfloat16:
        return None
    if not fmt.symmetric and pieces > 1 and (shape[-2] // pieces) % (32 // fmt.bits):
        return None  # zero points packed per piece, not continuing across the pieces
    return _INT8 if fmt.bits == 8 else _INT4


def covers(module: QuantizedModule, base: str) -> bool:
    """Whether the kernel reads weight `base` of module (its format and shape)."""
    return _code(module, base) is not None


def quant_gemv(
    module: QuantizedModule, base: str, ids_R: torch.Tensor | None, x_RI: torch.Tensor
) -> torch.Tensor | None:
    """y_RO[r] = dequantized(weight base of expert ids_R[r]) @ x_RI[r] (x_RI may be one row for all; ids None: a
    linear layer's own weight), or None where the kernel does not take it."""
    code = _code(module, base) if module.int8_activations else None
    if code is None or x_RI.dtype != torch.float32 or not x_RI.is_cpu or torch.is_grad_enabled():
        return None
    kernel = kernel_taking(x_RI)
    if kernel is None:
        return None
    parts = module.parts(base)
    if code == _FP8:
        return _fp8(kernel, module, base, parts, ids_R, x_RI)
    if code == _MXFP4:
        codes, scales, zero_points = parts["_blocks"].flatten(-2), parts["_scales"], None
    else:
        codes, scales, zero_points = parts["_packed"].view(torch.uint8), parts["_scale"], parts.get("_zero_point")
    if ids_R is None:
        codes, scales = codes.unsqueeze(0), scales.unsqueeze(0)
        zero_points = zero_points.unsqueeze(0) if zero_points is not None else None
        ids_R = torch.zeros(x_RI.shape[0], dtype=torch.long)
    out_rows = codes.shape[1]
    y_RO = x_RI.new_empty(ids_R.numel(), out_rows)
    empty = torch.empty(0, dtype=torch.int32)
    x = x_RI.contiguous() if x_RI.stride(0) != 0 else x_RI[:1].contiguous()
    kernel.quant_gemv(
        code,
        codes,
        scales,
        zero_points if zero_points is not None else empty,
        ids_R.contiguous(),
        x,
        y_RO,
        torch.get_num_threads(),
    )
    return y_RO


def _fp8(kernel, module: QuantizedModule, base: str, parts, ids_R, x_RI) -> torch.Tensor:
    w, scale = parts[""].view(torch.uint8), parts["_scale_inv"]
    if ids_R is None:
        w, scale, ids_R = w.unsqueeze(0), scale.unsqueeze(0), torch.zeros(x_RI.shape[0], dtype=torch.long)
    y_RO = x_RI.new_empty(ids_R.numel(), w.shape[1])
    x = x_RI.contiguous() if x_RI.stride(0) != 0 else x_RI[:1].contiguous()
    block, pieces = module.fmt.block, module._held[base][1]
    kernel.fp8_gemv(w, scale, block[0], block[1], pieces, ids_R.contiguous(), x, y_RO, torch.get_num_threads())
    return y_RO
