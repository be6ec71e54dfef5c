"""`moekit quantize`: a float checkpoint rewritten tensor by tensor into a quantized one that moekit (and, where the
format is one they know, transformers and vLLM) load. Each class of tensor takes its own precision; routers, norms
and biases stay in full precision. It streams: one tensor is read, quantized and queued for its shard at a time,
so quantizing costs about one shard of memory, not the model.

Formats (CHOICES): q8 / q4 (symmetric, group 32) and q4m (4-bit with a per-group minimum: asymmetric, a zero point
per group) as compressed-tensors pack-quantized, one config group per format, targeting the modules by name;
mxfp4 (gpt-oss's) and fp8 (e4m3, 128 x 128 blocks, DeepSeek's) as their own quant_method, which holds one format;
bf16 / fp32 / keep: not quantized."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moekit.checkpoint.files import INDEX, SINGLE, Shards, checkpoint_dir, fsync_path, weight_map
from moekit.checkpoint.keymap import KeyMap
from moekit.checkpoint.quantized import Scheme, quantization_config
from moekit.config.published import load_hf_config
from moekit.experts.weights import ExpertWeights
from moekit.families import model_from_hf, tensor_names
from moekit.model.meta import meta_model
from moekit.quant.formats import Format, Fp8Blocks, IntPacked, Mxfp4

CLASSES = ("experts", "shared", "attention", "dense", "embedding", "head")
CHOICES: dict[str, Format | None] = {
    "q8": IntPacked(bits=8),
    "q4": IntPacked(bits=4),
    "q4m": IntPacked(bits=4, symmetric=False),
    "mxfp4": Mxfp4(),
    "fp8": Fp8Blocks(),
    "bf16": None,
    "fp32": None,
    "keep": None,
}
FLOATS = {"bf16": torch.bfloat16, "fp32": torch.float32}
MAX_SHARD_BYTES = 2 * 2**30


def parse_weights(spec: str) -> dict[str, str]:
    """{class: choice} for every class from 'experts=q4,rest=q8' (rest: the classes not named; default keep)."""
    named: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in (*CLASSES, "rest"):
            raise ValueError(
                f"--weights item {item!r} is invalid: allowed CLASS=FORMAT, CLASS one of {', '.join(CLASSES)}, rest"
            )
        if value not in CHOICES:
            raise ValueError(f"--weights {key}={value!r} is invalid: allowed one of {', '.join(CHOICES)}")
        named[key] = value
    rest = named.pop("rest", "keep")
    choices = {c: named.get(c, rest) for c in CLASSES}
    if CHOICES[choices["embedding"]] is not None:
        if "embedding" in named:
            raise ValueError(
                f"--weights embedding={choices['embedding']} is invalid: allowed bf16, fp32, keep "
                "(embeddings are looked up, not multiplied)"
            )
        choices["embedding"] = "keep"
    floats = {FLOATS[v] for v in choices.values() if v in FLOATS}
    if len(floats) > 1:
        raise ValueError("--weights names both bf16 and fp32: allowed one float dtype for the unquantized tensors")
    special = {v for v in choices.values() if v in ("mxfp4", "fp8")}
    ints = {v for v in choices.values() if isinstance(CHOICES[v], IntPacked)}
    if len(special) > 1 or (special and ints):
        raise ValueError(
            f"--weights mixes {', '.join(sorted(special | ints))}: mxfp4 and fp8 are each their own "
            "quant_method, which holds one format; mix q8 / q4 / q4m freely"
        )
    return choices


def _classify(meta: nn.Module, keymap: KeyMap, name: str) -> tuple[str | None, bool]:
    """(class, stacked expert tensor) of checkpoint tensor `name`; class None: never quantized (norms, biases,
    routers, fused tensors, copies)."""
    experts = keymap.experts
    if keymap.fused_pieces(name) is not None:
        return None, False
    m = experts.pattern().match(name) if experts.per_expert else None
    if m:
        return ("experts", False) if m[4] == "" else (None, False)
    moekit = keymap.to_moekit(name)
    if moekit is None:
        return None, False
    path, _, attr = moekit.rpartition(".")
    try:
        owner = meta.get_submodule(path)
    except AttributeError:
        return None, False
    if isinstance(owner, ExpertWeights) and attr in ("gate_up_proj", "down_proj"):
        return "experts", True
    if isinstance(owner, nn.Embedding):
        return "embedding", False
    if not isinstance(owner, nn.Linear) or attr != "weight" or path.endswith("shared_expert_gate"):
        return None, False
    if path == "lm_head":
        return "head", False
    if ".shared_experts." in f"{path}.":
        return "shared", False
    return ("attention", False) if ".self_attn." in f"{path}." else ("dense", False)


def _module_pattern(names: set[str]) -> str:
    """One compressed-tensors target matching exactly these module names (layer and expert numbers generalised)."""
    shapes = sorted({re.sub(r"\\\.\d+(?=\\\.|$)", r"\\.\\d+", re.escape(n)) for n in names})
    return "re:^(?:" + "|".join(shapes) + ")$"


def quantize_checkpoint(
    source: str | Path, out: str | Path, weights: str, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Write the quantized checkpoint of `source` to `out` (which must not exist; written under a temporary name
    and renamed into place). Returns a report: per class its choice, tensors, weights and bytes before and after."""
    source, out = checkpoint_dir(source), Path(out)
    if out.exists():
        raise ValueError(f"{out}: exists: allowed a new directory (nothing is overwritten)")
    hf = load_hf_config(source)
    if "quantization_config" in hf:
        method = (hf["quantization_config"] or {}).get("quant_method")
        raise ValueError(f"{source}: already quantized (quant_method {method!r}): allowed a float checkpoint")
    choices = parse_weights(weights)
    cfg = model_from_hf(hf, name=source.name)
    meta = meta_model(cfg)
    keymap = KeyMap(cfg, tensor_names(cfg.family))
    files = weight_map(source)
    shards = Shards(files)
    float_dtype = next((FLOATS[v] for v in choices.values() if v in FLOATS), None)
    layout_transposed = cfg.moe is not None and cfg.moe.layout.transposed
    report = {
        c: {"format": choices[c], "tensors": 0, "weights": 0, "bytes_before": 0, "bytes_after": 0} for c in CLASSES
    }
    report["other"] = {"format": "keep", "tensors": 0, "weights": 0, "bytes_before": 0, "bytes_after": 0}
    targets: dict[str, set[str]] = {}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            file = tmp / f".shard-{len(written)}"
            save_file(pending, str(file), metadata={"format": "pt"})
            fsync_path(file)
            written.append((file, list(pending)))
        pending, pending_bytes = {}, 0

    try:
        for i, name in enumerate(files):
            t = shards.read(name)
            cls, stacked = _classify(meta, keymap, name)
            fmt = CHOICES[choices[cls]] if cls else None
            entry = report[cls or "other"]
            entry["tensors"] += 1
            entry["weights"] += t.numel()
            entry["bytes_before"] += t.numel() * t.element_size()
            if fmt is None:
                parts = {name: t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t}
            else:
                w = t.float().transpose(1, 2) if stacked and layout_transposed else t.float()
                try:
                    made = fmt.quantize(w)
                except ValueError as e:
                    raise ValueError(f"{files[name]}: {name}: {e}") from None
                parts = {name + s: p for s, p in made.items()}
                parts |= {name + s: p for s, p in fmt.derived(tuple(w.shape)).items()}
                targets.setdefault(choices[cls], set()).add(name if stacked else name.removesuffix(".weight"))
            for key, part in parts.items():
                part = part.contiguous()
                pending[key] = part
                n = part.numel() * part.element_size()
                entry["bytes_after"] += n
                pending_bytes += n
            if pending_bytes >= MAX_SHARD_BYTES:
                flush()
            if progress is not None:
                progress(i + 1, len(files))
        flush()
        _finish(tmp, out, source, hf, written, targets, float_dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _finish(tmp: Path, out: Path, source: Path, hf: dict, written, targets, float_dtype) -> None:
    """Name the shards, write the index and config.json, copy the tokenizer and other files, rename into place."""
    names = (
        [SINGLE]
        if len(written) == 1
        else [f"model-{i:05d}-of-{len(written):05d}.safetensors" for i in range(1, len(written) + 1)]
    )
    for (file, _), final in zip(written, names, strict=True):
        os.replace(file, tmp / final)
    if len(written) > 1:
        index = {
            "metadata": {},
            "weight_map": {k: n for (_, keys), n in zip(written, names, strict=True) for k in keys},
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
    config = dict(hf)
    if targets:
        groups = tuple((CHOICES[c], (_module_pattern(n),)) for c, n in sorted(targets.items()))
        if isinstance(groups[0][0], (Mxfp4, Fp8Blocks)):
            groups = ((groups[0][0], ("Linear",)),)
        config["quantization_config"] = quantization_config(Scheme(groups))
    if float_dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(float_dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    skip = {"config.json", INDEX, SINGLE}
    for f in source.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, tmp / f.name)
    for f in tmp.iterdir():
        fsync_path(f)
    os.rename(tmp, out)
    fsync_path(out.parent)
