"""A checkpoint's quantization: its config.json `quantization_config` read into a Format (and written back), and
which of the model's modules hold quantized weights, found from the files themselves (a format's marker part beside
a weight: q_proj.weight_scale_inv, experts.gate_up_proj_blocks, experts.3.gate_proj.weight_packed), which is what
the files hold whatever modules_to_not_convert or ignore lists say. The modules found are swapped for their
quantized counterparts on the meta model before it gets memory, so no weight is ever held in float."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from moekit.checkpoint.files import DTYPES, Shards
from moekit.checkpoint.keymap import KeyMap
from moekit.experts.mixed import MixedExperts
from moekit.experts.quantized import QuantizedExperts
from moekit.experts.weights import ExpertWeights
from moekit.layers.quantized_linear import QuantizedLinear
from moekit.quant.choices import AUTO, CHOICES, FLOATS, module_class, parse_weights
from moekit.quant.formats import Format, Fp8Blocks, IntPacked, Mxfp4, PackedFp4

METHODS = ("mxfp4", "fp8", "compressed-tensors")
ROUTED_EXPERTS = r"re:.*\.experts\."  # routed experts' modules, stacked or per expert (not shared_experts)


def _fail(field: str, value, allowed: str):
    raise ValueError(f"config.json: quantization_config.{field}={value!r} is unsupported: allowed {allowed}")


def _part_dtype(shards: Shards | None, suffix: str, default: torch.dtype) -> torch.dtype:
    """The dtype the files give the first tensor named ...suffix (scales are fp32 in some files, bf16 in others)."""
    if shards is not None:
        for name in shards.files:
            if name.endswith(suffix):
                return shards.dtype(name)
    return default


@dataclass(frozen=True)
class Scheme:
    """The formats of a checkpoint: groups of (format, targets), targets as compressed-tensors writes them (a class
    name such as "Linear", which every quantized module matches, or "re:REGEX" matched against the module's
    checkpoint name); the first group whose targets match decides."""

    groups: tuple[tuple[Format, tuple[str, ...]], ...]

    def format_for(self, module: str) -> Format:
        for fmt, targets in self.groups:
            if any(not t.startswith("re:") or re.match(t[3:], module) for t in targets):
                return fmt
        raise ValueError(f"{module}: quantized in the files, but no quantization_config group targets it")

    @property
    def markers(self) -> set[str]:
        return {fmt.marker for fmt, _ in self.groups}

    @cached_property
    def part_suffixes(self) -> tuple[str, ...]:
        """The suffixes of the parts beside the weights: scales, zero points, shapes."""
        return tuple({s for fmt, _ in self.groups for s in (*fmt.parts((256, 256)), *fmt.derived((256, 256))) if s})

    def is_part(self, name: str) -> bool:
        """Whether a checkpoint tensor is a quantized weight's scale, zero point or shape (not a float tensor)."""
        return name.endswith(self.part_suffixes)


def scheme_of(hf: dict, shards: Shards | None = None) -> Scheme | None:
    """The Scheme of a config.json's quantization_config (None when it has none); shards: the files, whose scale
    dtypes the formats take."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        _fail("", qc, "an object")
    method = qc.get("quant_method")
    if method == "mxfp4":
        return Scheme(((Mxfp4(), ("Linear",)),))
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            _fail("fmt", qc.get("fmt"), "'e4m3'")
        block = qc.get("weight_block_size") or [128, 128]
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            _fail("weight_block_size", block, "two positive integers (rows, columns)")
        scale = _part_dtype(shards, "weight_scale_inv", torch.float32)
        fmt = Fp8Blocks(block=tuple(block), scale_dtype=scale, ue8m0=qc.get("scale_fmt") == "ue8m0")
        if hf.get("expert_dtype") == "fp4":  # DeepSeek-V4: the routed experts in packed 4-bit floats
            return Scheme(((PackedFp4(), (ROUTED_EXPERTS,)), (fmt, ("Linear",))))
        return Scheme(((fmt, ("Linear",)),))
    if method == "compressed-tensors":
        return _compressed_tensors(qc, shards)
    return _fail("quant_method", method, ", ".join(map(repr, METHODS)))


def _compressed_tensors(qc: dict, shards: Shards | None) -> Scheme:
    if qc.get("format") != "pack-quantized":
        _fail("format", qc.get("format"), "'pack-quantized' (integer weights, as Kimi-K2.5 ships them)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        _fail("config_groups", groups, "one group or more")
    out = []
    for key, group in groups.items():
        w = (group or {}).get("weights") or {}
        field = f"config_groups.{key}.weights"
        if w.get("num_bits") not in (2, 3, 4, 8):
            _fail(f"{field}.num_bits", w.get("num_bits"), "2, 3, 4 or 8")
        for k, value in {"type": "int", "strategy": "group"}.items():
            if w.get(k) != value:
                _fail(f"{field}.{k}", w.get(k), repr(value))
        size = w.get("group_size")
        if not isinstance(size, int) or size <= 0 or size % 8:
            _fail(f"{field}.group_size", size, "a positive multiple of 8")
        fmt = IntPacked(
            bits=w["num_bits"],
            group=size,
            symmetric=bool(w.get("symmetric", True)),
            scale_dtype=_part_dtype(shards, "weight_scale", torch.bfloat16),
            shape_dtype=_part_dtype(shards, "weight_shape", torch.int64),
        )
        out.append((fmt, tuple((group or {}).get("targets") or ("Linear",))))
    return Scheme(tuple(out))


def quantization_config(scheme: Scheme) -> dict:
    """The quantization_config a checkpoint in `scheme` declares (the inverse of scheme_of; DeepSeek-V4's packed
    FP4 experts are declared beside it, by expert_dtype)."""
    fmt = scheme.groups[-1][0] if isinstance(scheme.groups[0][0], PackedFp4) else scheme.groups[0][0]
    if isinstance(fmt, Mxfp4):
        return {"quant_method": "mxfp4"}
    if isinstance(fmt, Fp8Blocks):
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        return {**qc, "weight_block_size": list(fmt.block), **({"scale_fmt": "ue8m0"} if fmt.ue8m0 else {})}
    groups = {}
    for i, (f, targets) in enumerate(scheme.groups):
        weights = {"num_bits": f.bits, "type": "int", "symmetric": f.symmetric, "strategy": "group"}
        weights |= {"group_size": f.group, "dynamic": False}
        groups[f"group_{i}"] = {"targets": list(targets), "weights": weights}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
    }


@dataclass(frozen=True)
class Target:
    """A module of the model holding quantized weights: a linear layer, or a layer's routed experts (stacked in the
    files, or one tensor per expert and projection)."""

    module: str
    kind: str  # "linear" | "experts"
    fmt: Format
    per_expert: bool = False
    expert_formats: tuple[tuple[int, Format], ...] = ()  # (expert, format) where experts differ (MixedExperts)


def quantized_targets(scheme: Scheme, names: Iterable[str], keymap: KeyMap) -> dict[str, Target]:
    """{module path: Target} of the modules whose weights the checkpoint tensor names hold quantized."""
    experts = keymap.experts
    pattern = experts.pattern() if experts.per_expert else None
    out: dict[str, Target] = {}
    by_expert: dict[str, dict[int, Format]] = {}  # per-expert files: each expert's format
    for name in names:
        marker = next((m for m in scheme.markers if name.endswith(m)), None)
        if marker is None:
            continue
        base = name[: -len(marker)]
        fmt = scheme.format_for(base.removesuffix(".weight"))
        m = pattern.match(base) if pattern else None
        if m:
            module = keymap.to_moekit(f"{m[1]}.mlp.experts.gate_up_proj").removesuffix(".gate_up_proj")
            known = by_expert.setdefault(module, {}).setdefault(int(m[2]), fmt)
            if known != fmt:
                raise ValueError(f"{name}: {fmt.name}, where the expert's other weights are {known.name}")
            continue
        moekit = keymap.to_moekit(base)
        if moekit is None:
            continue
        module, attr = moekit.rsplit(".", 1)
        kind = "linear" if attr == "weight" else "experts" if attr in ("gate_up_proj", "down_proj") else None
        if kind is None:
            raise ValueError(f"{name}: a {fmt.name} part beside {base!r}, which is no weight moekit quantizes")
        _add(out, Target(module, kind, fmt), name)
    for module, formats in by_expert.items():
        distinct = set(formats.values())
        mixed = tuple(sorted(formats.items())) if len(distinct) > 1 else ()
        out[module] = Target(module, "experts", next(iter(distinct)), per_expert=True, expert_formats=mixed)
    return out


def _add(targets: dict[str, Target], target: Target, name: str) -> None:
    known = targets.setdefault(target.module, target)
    if known.fmt != target.fmt:
        raise ValueError(f"{name}: {target.fmt.name}, where the module's other weights are {known.fmt.name}")


def load_targets(model: nn.Module, keymap: KeyMap, spec: str, shipped: dict[str, Target]) -> dict[str, Target]:
    """{module path: Target} of the modules to quantize while loading, from a --weights spec (moekit quantize's
    classes and formats): the float modules of each class given a format; modules the checkpoint ships quantized
    keep their format; modules filled from fused checkpoint tensors (DBRX's Wqkv) stay float."""
    choices = parse_weights(spec)
    if choices["experts"] == AUTO:
        raise ValueError("quantize: experts=auto calibrates on text: allowed in moekit quantize, not while loading")
    floats = sorted({c for c, v in choices.items() if v in FLOATS})
    if floats:
        raise ValueError(f"quantize: {floats[0]}={choices[floats[0]]} is a dtype: allowed formats (pass dtype=)")
    fused = {t.rpartition(".")[0] for pieces in keymap.fused_names().values() for t, _ in pieces}
    out = {}
    for path, module in model.named_modules():
        cls = module_class(path, module)
        fmt = CHOICES[choices[cls]] if cls else None
        if fmt is None or path in shipped or path in fused:
            continue
        if cls == "experts" and keymap.experts.per_expert:
            raise ValueError(
                f"quantize: experts={choices[cls]}: this family's files hold one tensor per expert, which loading "
                "does not quantize: allowed the other classes (or run moekit quantize first)"
            )
        out[path] = Target(path, "experts" if cls == "experts" else "linear", fmt)
    return out


def install(model: nn.Module, targets: dict[str, Target]) -> None:
    """Swap each target module of model for its quantized counterpart (on the model's device: meta stays meta)."""
    for target in targets.values():
        parent_name, _, child = target.module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module, fmt = getattr(parent, child, None), target.fmt
        if target.kind == "linear" and isinstance(module, nn.Linear):
            setattr(parent, child, QuantizedLinear.like(module, fmt))
        elif target.kind == "experts" and isinstance(module, ExpertWeights):
            pieces = 2 if target.per_expert and module.layout.gated else 1
            formats = dict(target.expert_formats)
            lacking = [e for e in range(module.num_experts) if formats and e not in formats]
            if lacking:
                raise ValueError(f"{target.module}: expert {lacking[0]} has no quantized weights, its neighbours do")
            try:
                if formats:
                    held = MixedExperts.like(module, [formats[e] for e in range(module.num_experts)], pieces)
                else:
                    held = QuantizedExperts.like(module, fmt, pieces)
            except ValueError as e:
                raise ValueError(f"{target.module}: {e} ({fmt.name} cannot hold these experts)") from None
            setattr(parent, child, held)
        else:
            what = "a linear layer" if target.kind == "linear" else "routed experts"
            raise ValueError(f"{target.module}: the checkpoint holds {what} there in {fmt.name}; this model does not")


# dtypes a quantized part may have in the files and nowhere else: such a part is never converted on load
PART_DTYPES = tuple(DTYPES[k] for k in ("F8_E4M3", "U8", "I32"))
