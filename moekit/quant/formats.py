"""The quantized formats as moekit holds them: each weight [..., out, in] is a few tensors ("parts") named by a
suffix on the weight's own name, exactly as the checkpoints name them (q_proj.weight + q_proj.weight_scale_inv,
experts.gate_up_proj_blocks + _scales, ...), so a quantized module's state dict is the checkpoint's. A format says
which parts a weight has, checks them, dequantizes them (the reference every kernel is tested against) and quantizes
a float weight into them.

pieces: a weight stacked from equal row blocks quantized on their own (an expert's gate and up projections, each
[F, D] in a per-expert checkpoint, held as one [2F, D]); only formats whose scales span several rows (FP8's 128 x
128 blocks) see the difference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.quant import fp8_blocks, int_pack, mxfp4

Parts = dict[str, torch.Tensor]
E8M0 = torch.float8_e8m0fnu  # power-of-two scale bytes (UE8M0)


@dataclass(frozen=True)
class Format:
    """marker: the part whose name identifies the format in a checkpoint."""

    name = ""  # as the user names it (moekit quantize --weights, inspect)
    marker = ""

    def parts(self, shape: tuple[int, ...], pieces: int = 1) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{suffix: (shape, dtype)} of the parts of a weight of `shape` [..., out, in]."""
        raise NotImplementedError

    def dequantize(self, parts: Parts, shape: tuple[int, ...], pieces: int = 1, name: str = "weight") -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, pieces: int = 1) -> Parts:
        raise NotImplementedError

    def check(self, parts: Parts, name: str) -> None:
        """A ValueError naming `name` for scales no weight can have (cheap: reads the scales only)."""

    def derived(self, shape: tuple[int, ...]) -> Parts:
        """Parts a checkpoint stores that follow from the shape (written on save, checked on load, not held)."""
        return {}

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes a checkpoint stores for a weight of `shape`: its parts and the parts derived from the shape."""
        parts = [*self.parts(shape).values(), *((t.shape, t.dtype) for t in self.derived(shape).values())]
        return sum(math.prod(s) * d.itemsize for s, d in parts)

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        held = sum(math.prod(s) * d.itemsize for s, d in self.parts(shape).values())
        return 8 * held / math.prod(shape)


def _pieces(t: torch.Tensor, pieces: int) -> torch.Tensor:
    return t.unflatten(-2, (pieces, t.shape[-2] // pieces))


@dataclass(frozen=True)
class Mxfp4(Format):
    """MXFP4 (gpt-oss): X_blocks uint8 [..., out, in/32, 16], X_scales uint8 [..., out, in/32]."""

    name = "mxfp4"
    marker = "_blocks"

    def parts(self, shape, pieces=1):
        *lead, out, width = shape
        if width % mxfp4.GROUP:
            raise ValueError(f"input width {width} is invalid for MXFP4: allowed a multiple of {mxfp4.GROUP}")
        groups = width // mxfp4.GROUP
        return {
            "_blocks": ((*lead, out, groups, mxfp4.GROUP // 2), torch.uint8),
            "_scales": ((*lead, out, groups), torch.uint8),
        }

    def dequantize(self, parts, shape, pieces=1, name="weight"):
        return mxfp4.dequantize(parts["_blocks"], parts["_scales"], name=name)

    def quantize(self, w, pieces=1):
        blocks, scales = mxfp4.quantize(w)
        return {"_blocks": blocks, "_scales": scales}

    def check(self, parts, name):
        if bool((parts["_scales"] == 255).any()):
            raise ValueError(f"{name}_scales: MXFP4 scale byte 255 (NaN) found: allowed 0-254")


@dataclass(frozen=True)
class PackedFp4(Mxfp4):
    """DeepSeek-V4's routed experts: MXFP4's values and scales as X int8 [..., out, in/2] (two e2m1 per byte, the
    lower element in the low nibble) and X_scale_inv float8_e8m0fnu [..., out, in/32] (the release names it
    X.scale)."""

    name = "fp4"
    marker = "_scale_inv"

    def parts(self, shape, pieces=1):
        blocks, scales = super().parts(shape).values()
        return {"": ((*blocks[0][:-2], blocks[0][-2] * blocks[0][-1]), torch.int8), "_scale_inv": (scales[0], E8M0)}

    def dequantize(self, parts, shape, pieces=1, name="weight"):
        return super().dequantize(self.as_mxfp4(parts), shape, pieces, name)

    def quantize(self, w, pieces=1):
        blocks, scales = mxfp4.quantize(w)
        return {"": blocks.flatten(-2).view(torch.int8), "_scale_inv": scales.view(E8M0)}

    def check(self, parts, name):
        super().check(self.as_mxfp4(parts), name)

    @staticmethod
    def as_mxfp4(parts: Parts) -> Parts:
        """The same bytes as Mxfp4's parts (_blocks [..., out, in/32, 16], _scales [..., out, in/32] uint8)."""
        codes = parts[""].view(torch.uint8)
        return {
            "_blocks": codes.unflatten(-1, (-1, mxfp4.GROUP // 2)),
            "_scales": parts["_scale_inv"].view(torch.uint8),
        }


@dataclass(frozen=True)
class Fp8Blocks(Format):
    """FP8 e4m3 with one scale per block (DeepSeek-V3, Qwen3-FP8): X float8_e4m3fn [..., out, in] and X_scale_inv
    [..., ceil(out / b0), ceil(in / b1)] (per piece), in scale_dtype (fp32 in the shipped files)."""

    name = "fp8"
    marker = "_scale_inv"
    block: tuple[int, int] = fp8_blocks.BLOCK
    scale_dtype: torch.dtype = torch.float32
    ue8m0: bool = False

    def parts(self, shape, pieces=1):
        *lead, out, width = shape
        if out % pieces:
            raise ValueError(f"{out} rows do not split into {pieces} pieces")
        grid = (pieces * math.ceil(out // pieces / self.block[0]), math.ceil(width / self.block[1]))
        return {"": ((*lead, out, width), torch.float8_e4m3fn), "_scale_inv": ((*lead, *grid), self.scale_dtype)}

    def dequantize(self, parts, shape, pieces=1, name="weight"):
        w, scale = _pieces(parts[""], pieces), _pieces(parts["_scale_inv"], pieces)
        return fp8_blocks.dequantize(w, scale, self.block, name=name).flatten(-3, -2)

    def quantize(self, w, pieces=1):
        q, scale = fp8_blocks.quantize(_pieces(w, pieces), self.block, ue8m0=self.ue8m0)
        return {"": q.flatten(-3, -2), "_scale_inv": scale.flatten(-3, -2).to(self.scale_dtype)}

    def check(self, parts, name):
        if not bool(torch.isfinite(parts["_scale_inv"].float()).all()):
            raise ValueError(f"{name}_scale_inv: holds NaN or inf: allowed finite scales")


@dataclass(frozen=True)
class IntPacked(Format):
    """compressed-tensors pack-quantized integers (Kimi-K2.5's INT4 experts; moekit's q8 / q4 / q4 with a minimum):
    X_packed int32 [..., out, ceil(in * bits / 32)], X_scale [..., out, ceil(in / group)] in scale_dtype (bf16 in
    the files), asymmetric: X_zero_point int32 [..., ceil(out * bits / 32), groups] (per piece); the checkpoint
    also stores X_shape ([out, in] of each piece, in shape_dtype)."""

    marker = "_packed"
    bits: int = 4
    group: int = int_pack.GROUP
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16
    shape_dtype: torch.dtype = torch.int64

    @property
    def name(self) -> str:
        return f"int{self.bits}" + ("" if self.symmetric else "_asym")

    def parts(self, shape, pieces=1):
        *lead, out, width = shape
        words, groups = int_pack.words(width, self.bits), -(-width // self.group)
        held = {"_packed": ((*lead, out, words), torch.int32), "_scale": ((*lead, out, groups), self.scale_dtype)}
        if not self.symmetric:
            if out % pieces:
                raise ValueError(f"{out} rows do not split into {pieces} pieces")
            held["_zero_point"] = ((*lead, pieces * int_pack.words(out // pieces, self.bits), groups), torch.int32)
        return held

    def dequantize(self, parts, shape, pieces=1, name="weight"):
        if self.symmetric or pieces == 1:
            return self._dequantize(parts, shape, name)
        split = {s: _pieces(t, pieces) for s, t in parts.items()}
        return self._dequantize(split, (*shape[:-2], pieces, shape[-2] // pieces, shape[-1]), name).flatten(-3, -2)

    def _dequantize(self, parts, shape, name):
        zp = parts.get("_zero_point")
        return int_pack.dequantize(parts["_packed"], parts["_scale"], shape[-2:], name, self.group, self.bits, zp)

    def quantize(self, w, pieces=1):
        if not self.symmetric and pieces > 1:
            packed, scale, zp = int_pack.quantize(_pieces(w, pieces), self.group, self.bits, False)
            return {
                "_packed": packed.flatten(-3, -2),
                "_scale": scale.flatten(-3, -2).to(self.scale_dtype),
                "_zero_point": zp.flatten(-3, -2),
            }
        packed, scale, zp = int_pack.quantize(w, self.group, self.bits, self.symmetric)
        out = {"_packed": packed, "_scale": scale.to(self.scale_dtype)}
        return out if zp is None else {**out, "_zero_point": zp}

    def check(self, parts, name):
        if not bool(torch.isfinite(parts["_scale"].float()).all()):
            raise ValueError(f"{name}_scale: holds NaN or inf: allowed finite scales")

    def derived(self, shape):
        return {"_shape": torch.tensor(shape[-2:], dtype=self.shape_dtype)}
