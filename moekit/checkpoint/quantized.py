"""A checkpoint's quantization: its config.json `quantization_config` read into a Format (and written back), and
which of the model's modules hold quantized weights, found from the files themselves (a format's marker part beside
a weight: q_proj.weight_scale_inv, experts.gate_up_proj_blocks, experts.3.gate_proj.weight_packed), which is what
the files hold whatever modules_to_not_convert or ignore lists say. The modules found are swapped for their
quantized counterparts on the meta model before it gets memory, so no weight is ever held in float."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from moekit.checkpoint.files import DTYPES, Shards
from moekit.checkpoint.keymap import KeyMap
from moekit.experts.quantized import QuantizedExperts
from moekit.experts.weights import ExpertWeights
from moekit.layers.quantized_linear import QuantizedLinear
from moekit.quant.formats import Format, Fp8Blocks, Int4Packed, Mxfp4

METHODS = ("mxfp4", "fp8", "compressed-tensors")


def _fail(field: str, value, allowed: str):
    raise ValueError(f"config.json: quantization_config.{field}={value!r} is unsupported: allowed {allowed}")


def _part_dtype(shards: Shards | None, suffix: str, default: torch.dtype) -> torch.dtype:
    """The dtype the files give the first tensor named ...suffix (scales are fp32 in some files, bf16 in others)."""
    if shards is not None:
        for name in shards.files:
            if name.endswith(suffix):
                return shards.dtype(name)
    return default


def format_of(hf: dict, shards: Shards | None = None) -> Format | None:
    """The Format of a config.json's quantization_config (None when it has none); shards: the files, whose scale
    dtypes the format takes."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        _fail("", qc, "an object")
    method = qc.get("quant_method")
    if method == "mxfp4":
        return Mxfp4()
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            _fail("fmt", qc.get("fmt"), "'e4m3'")
        block = qc.get("weight_block_size") or [128, 128]
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            _fail("weight_block_size", block, "two positive integers (rows, columns)")
        scale = _part_dtype(shards, "weight_scale_inv", torch.float32)
        return Fp8Blocks(block=tuple(block), scale_dtype=scale, ue8m0=qc.get("scale_fmt") == "ue8m0")
    if method == "compressed-tensors":
        return _compressed_tensors(qc, shards)
    return _fail("quant_method", method, ", ".join(map(repr, METHODS)))


def _compressed_tensors(qc: dict, shards: Shards | None) -> Format:
    if qc.get("format") != "pack-quantized":
        _fail("format", qc.get("format"), "'pack-quantized' (INT4 as Kimi-K2.5 ships it)")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0], dict):
        _fail("config_groups", len(groups), "one group")
    w = groups[0].get("weights") or {}
    want = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    for key, value in want.items():
        if w.get(key) != value:
            _fail(f"config_groups.weights.{key}", w.get(key), repr(value))
    group = w.get("group_size")
    if not isinstance(group, int) or group <= 0 or group % 8:
        _fail("config_groups.weights.group_size", group, "a positive multiple of 8")
    return Int4Packed(
        group=group,
        scale_dtype=_part_dtype(shards, "weight_scale", torch.bfloat16),
        shape_dtype=_part_dtype(shards, "weight_shape", torch.int64),
    )


def quantization_config(fmt: Format) -> dict:
    """The quantization_config a checkpoint in fmt declares (the inverse of format_of)."""
    if isinstance(fmt, Mxfp4):
        return {"quant_method": "mxfp4"}
    if isinstance(fmt, Fp8Blocks):
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        return {**qc, "weight_block_size": list(fmt.block), **({"scale_fmt": "ue8m0"} if fmt.ue8m0 else {})}
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": fmt.group}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**weights, "dynamic": False}}},
    }


@dataclass(frozen=True)
class Target:
    """A module of the model holding quantized weights: a linear layer, or a layer's routed experts (stacked in the
    files, or one tensor per expert and projection)."""

    module: str
    kind: str  # "linear" | "experts"
    per_expert: bool = False


def quantized_targets(fmt: Format, names: Iterable[str], keymap: KeyMap) -> dict[str, Target]:
    """{module path: Target} of the modules whose weights the checkpoint tensor names hold in fmt."""
    experts = keymap.experts
    pattern = experts.pattern() if experts.per_expert else None
    out: dict[str, Target] = {}
    for name in names:
        if not name.endswith(fmt.marker):
            continue
        base = name[: -len(fmt.marker)] if fmt.marker else name
        m = pattern.match(base) if pattern else None
        if m:
            module = keymap.to_moekit(f"{m[1]}.mlp.experts.gate_up_proj").removesuffix(".gate_up_proj")
            out[module] = Target(module, "experts", per_expert=True)
            continue
        moekit = keymap.to_moekit(base)
        if moekit is None:
            continue
        module, attr = moekit.rsplit(".", 1)
        kind = "linear" if attr == "weight" else "experts" if attr in ("gate_up_proj", "down_proj") else None
        if kind is None:
            raise ValueError(f"{name}: a {fmt.name} part beside {base!r}, which is no weight moekit quantizes")
        out[module] = Target(module, kind)
    return out


def install(model: nn.Module, fmt: Format, targets: dict[str, Target]) -> None:
    """Swap each target module of model for its quantized counterpart (on the model's device: meta stays meta)."""
    for target in targets.values():
        parent_name, _, child = target.module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child, None)
        if target.kind == "linear" and isinstance(module, nn.Linear):
            setattr(parent, child, QuantizedLinear.like(module, fmt))
        elif target.kind == "experts" and isinstance(module, ExpertWeights):
            pieces = 2 if target.per_expert and module.layout.gated else 1
            try:
                setattr(parent, child, QuantizedExperts.like(module, fmt, pieces))
            except ValueError as e:
                raise ValueError(f"{target.module}: {e} ({fmt.name} cannot hold these experts)") from None
        else:
            what = "a linear layer" if target.kind == "linear" else "routed experts"
            raise ValueError(f"{target.module}: the checkpoint holds {what} there in {fmt.name}; this model does not")


# dtypes a quantized part may have in the files and nowhere else: such a part is never converted on load
PART_DTYPES = tuple(DTYPES[k] for k in ("F8_E4M3", "U8", "I32"))
