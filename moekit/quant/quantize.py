"""`moekit quantize`: a float checkpoint rewritten tensor by tensor into a quantized one that moekit (and, where the
format is one they know, transformers and vLLM) load. Each class of tensor takes its own precision; routers, norms
and biases stay in full precision. It streams: one tensor is read, quantized and queued for its shard at a time,
so quantizing costs about one shard of memory, not the model.

Formats (quant/choices.py): q8 / q4 / q3 / q2 (symmetric, group 32) and q4m (4-bit with a per-group minimum:
asymmetric, a zero point per group) as compressed-tensors pack-quantized, one config group per format, targeting
the modules by name; mxfp4 (gpt-oss's) and fp8 (e4m3, 128 x 128 blocks, DeepSeek's) as their own quant_method,
which holds one format; bf16 / fp32 / keep: not quantized; experts=auto: a format per routed expert
(quant/mixed.py), each expert named in its format's group."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moekit.checkpoint.files import INDEX, SINGLE, checkpoint_dir, fsync_path
from moekit.checkpoint.hf_checkpoint import checkpoint_tensors, load_pretrained, open_checkpoint
from moekit.checkpoint.keymap import KeyMap
from moekit.checkpoint.quantized import Scheme, quantization_config
from moekit.experts.weights import ExpertWeights
from moekit.families import model_from_hf, tensor_names
from moekit.model.meta import meta_model
from moekit.quant import mixed
from moekit.quant.choices import AUTO, CHOICES, CLASSES, FLOATS, check_one_method, module_class, parse_weights
from moekit.quant.formats import Format, Fp8Blocks, Mxfp4, Parts

MAX_SHARD_BYTES = 2 * 2**30


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
    if isinstance(owner, ExpertWeights):
        return ("experts", True) if attr in ("gate_up_proj", "down_proj") else (None, False)
    cls = module_class(path, owner)
    return (cls, False) if cls is not None and (attr == "weight" or cls == "embedding") else (None, False)


def _module_pattern(names: set[str], exact_experts: bool = False) -> str:
    """One compressed-tensors target matching exactly these module names: layer numbers generalised, and expert
    numbers too unless exact_experts (then each layer's experts of this format are listed)."""
    shapes, experts = set(), {}
    for n in names:
        m = re.match(r"^(.*\.experts\.)(\d+)(\..*)$", n) if exact_experts else None
        if m:
            experts.setdefault((m[1], m[3]), []).append(int(m[2]))
        else:
            shapes.add(re.sub(r"\\\.\d+(?=\\\.|$)", r"\\.\\d+", re.escape(n)))
    for (before, after), ids in experts.items():
        shapes.add(re.escape(before) + "(?:" + "|".join(map(str, sorted(ids))) + ")" + re.escape(after))
    return "re:^(?:" + "|".join(sorted(shapes)) + ")$"


def quantize_checkpoint(
    source: str | Path,
    out: str | Path,
    weights: str,
    progress: Callable[[int, int], None] | None = None,
    *,
    target_bits: float | None = None,
    target_gb: float | None = None,
    calibration: str | None = None,
    calibration_tokens: int = mixed.CALIBRATION_TOKENS,
    candidates: tuple[str, ...] = mixed.CANDIDATES,
) -> dict:
    """Write the quantized checkpoint of `source` to `out` (which must not exist; written under a temporary name
    and renamed into place). Returns a report: per class its choice, tensors, weights and bytes before and after.
    experts=auto: a format per routed expert (moekit.quant.mixed) within target_bits (bits per routed-expert
    weight) or target_gb (the whole checkpoint), calibrated on `calibration` text (default: the standard library's);
    the choice is saved beside the weights (expert_formats.json) and reported under "experts_auto"."""
    source = checkpoint_dir(source)
    if Path(out).exists():  # before any calibration: nothing is overwritten
        raise ValueError(f"{out}: exists: allowed a new directory (nothing is overwritten)")
    hf, files, shards, _ = open_checkpoint(source)  # a multimodal wrapper: its language model
    if "quantization_config" in hf:
        method = (hf["quantization_config"] or {}).get("quant_method")
        raise ValueError(f"{source}: already quantized (quant_method {method!r}): allowed a float checkpoint")
    names = {n: (shards.shape(n), shards.dtype(n)) for n in files}

    def quantized(name: str, fmt: Format, shape: tuple[int, ...], transposed: bool) -> Parts:
        w = shards.read(name).float()
        try:
            return fmt.quantize(w.transpose(1, 2) if transposed else w)
        except ValueError as e:
            raise ValueError(f"{files[name]}: {name}: {e}") from None

    auto = None
    if parse_weights(weights)["experts"] == AUTO:
        auto = _auto(source, hf, names, weights, target_bits, target_gb, calibration, calibration_tokens, candidates)
    elif target_bits is not None or target_gb is not None:
        raise ValueError("target_bits / target_gb are for experts=auto: allowed only with it")
    report = _write(hf, names, lambda name: shards.read(name), quantized, out, weights, source, progress, auto)
    if auto is not None:
        report["experts_auto"] = auto
    return report


def _auto(source, hf, names, weights, target_bits, target_gb, calibration, tokens, candidates) -> dict:
    """Calibrate the float model and choose each routed expert's format within the budget (see moekit.quant.mixed);
    the result as saved in expert_formats.json."""
    if (target_bits is None) == (target_gb is None):
        raise ValueError("experts=auto needs one budget: allowed target_bits (per routed-expert weight) or target_gb")
    cfg = model_from_hf(hf, name=source.name)
    keymap = KeyMap(cfg, tensor_names(cfg.family))
    if cfg.moe is None or not keymap.experts.per_expert:
        raise ValueError(
            f"experts=auto: {cfg.family} checkpoints stack each layer's experts in one tensor, which holds one "
            "format: allowed families whose files hold a tensor per expert (DeepSeek, Qwen, Mixtral, OLMoE, ...)"
        )
    model = load_pretrained(source, torch.float32)
    stats = mixed.calibrate(model, mixed.calibration_batches(source, cfg.vocab_size, calibration, tokens), candidates)
    del model
    expert_weights = sum(s.params_per_expert * len(s.tokens_E) for s in stats)
    if target_bits is not None:
        budget = target_bits / 8 * expert_weights
    else:
        budget = target_gb * 1e9 - _bytes_without_experts(cfg, keymap, names, parse_weights(weights))
    plan = mixed.choose(stats, budget, candidates)
    return mixed.summary(stats, plan, candidates, budget, expert_weights)


def _bytes_without_experts(cfg, keymap: KeyMap, names: dict, choices: dict[str, str]) -> float:
    """The bytes every checkpoint tensor but the routed experts' takes under the choices."""
    meta = meta_model(cfg)
    float_dtype = next((FLOATS[v] for v in choices.values() if v in FLOATS), None)
    total = 0.0
    for name, (shape, dtype) in names.items():
        cls, stacked = _classify(meta, keymap, name)
        if cls == "experts":
            continue
        fmt = CHOICES[choices[cls]] if cls else None
        if fmt is None:
            size = (float_dtype or dtype).itemsize if dtype.is_floating_point else dtype.itemsize
            total += math.prod(shape) * size
            continue
        total += fmt.stored_bytes(shape)
    return total


def random_checkpoint(
    hf: dict, out: str | Path, weights: str, seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> dict:
    """A checkpoint of config.json `hf`'s shapes with random weights, written straight into the formats `weights`
    chooses (quantized parts are random codes with scales of ordinary size; never made as floats first), in the
    family's checkpoint layout: a real-size model for measuring memory and speed in minutes, not hours. Unquantized
    tensors are bf16 (norm weights ones). Returns the report of quantize_checkpoint."""
    cfg = model_from_hf(hf)
    meta = meta_model(cfg, torch.bfloat16)
    tensors = checkpoint_tensors(meta)
    names = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    gen = torch.Generator().manual_seed(seed)

    def floats(name: str) -> torch.Tensor:
        shape, dtype = names[name]
        if not dtype.is_floating_point:
            return tensors[name]  # derived parts, made from the shape
        if len(shape) == 1 and "norm" in name:
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    def quantized(name: str, fmt: Format, shape: tuple[int, ...], transposed: bool) -> Parts:
        held = (shape[0], shape[2], shape[1]) if transposed else shape
        return {s: random_part(s, part_shape, dtype, gen) for s, (part_shape, dtype) in fmt.parts(held).items()}

    return _write(hf, names, floats, quantized, out, weights, None, progress)


def random_part(suffix: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random quantized part: any code is valid; scales keep the weights near the usual 0.01-0.1."""
    if dtype == torch.uint8 and suffix == "_scales":  # MXFP4 exponents: 2^-9 .. 2^-5
        return torch.randint(118, 123, shape, generator=gen, dtype=torch.uint8)
    if dtype in (torch.uint8, torch.int32):
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)
    if dtype == torch.float8_e4m3fn:
        return torch.randn(shape, generator=gen).clamp(-448, 448).to(dtype)
    return (torch.rand(shape, generator=gen) * 0.01 + 0.005).to(dtype)  # group or block scales


def _write(
    hf: dict,
    names: dict[str, tuple[tuple[int, ...], torch.dtype]],
    floats: Callable[[str], torch.Tensor],
    quantized: Callable[[str, Format, tuple[int, ...], bool], Parts],
    out: str | Path,
    weights: str,
    source: Path | None,
    progress: Callable[[int, int], None] | None,
    auto: dict | None = None,
) -> dict:
    """Write checkpoint tensors `names` ({name: (shape, dtype)}) to `out` under the --weights choices: floats(name)
    gives an unquantized tensor, quantized(name, format, shape, stacked and transposed) a quantized one's parts;
    auto: experts=auto's choice (each expert's format by module, written beside the weights)."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: exists: allowed a new directory (nothing is overwritten)")
    choices = parse_weights(weights)
    check_one_method(choices)
    cfg = model_from_hf(hf, name=out.name)
    meta = meta_model(cfg)
    keymap = KeyMap(cfg, tensor_names(cfg.family))
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
        for i, (name, (shape, dtype)) in enumerate(names.items()):
            cls, stacked = _classify(meta, keymap, name)
            choice = choices[cls] if cls else None
            if choice == AUTO:
                m = keymap.experts.pattern().match(name)
                module = keymap.to_moekit(f"{m[1]}.mlp.experts.gate_up_proj").removesuffix(".gate_up_proj")
                choice = auto["layers"][module]["formats"][int(m[2])]
            fmt = CHOICES[choice] if choice else None
            entry = report[cls or "other"]
            entry["tensors"] += 1
            entry["weights"] += math.prod(shape)
            entry["bytes_before"] += math.prod(shape) * dtype.itemsize
            if fmt is None:
                t = floats(name)
                parts = {name: t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t}
            else:
                transposed = stacked and layout_transposed
                held = (shape[0], shape[2], shape[1]) if transposed else shape
                parts = {name + s: p for s, p in quantized(name, fmt, shape, transposed).items()}
                parts |= {name + s: p for s, p in fmt.derived(held).items()}
                targets.setdefault(choice, set()).add(name if stacked else name.removesuffix(".weight"))
            for key, part in parts.items():
                part = part.contiguous()
                pending[key] = part
                n = part.numel() * part.element_size()
                entry["bytes_after"] += n
                pending_bytes += n
            if pending_bytes >= MAX_SHARD_BYTES:
                flush()
            if progress is not None:
                progress(i + 1, len(names))
        flush()
        if auto is not None:
            (tmp / mixed.CHOICE_FILE).write_text(json.dumps(auto, indent=2))
        _finish(tmp, out, source, hf, written, targets, float_dtype, exact_experts=auto is not None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _finish(
    tmp: Path, out: Path, source: Path | None, hf: dict, written, targets, float_dtype, exact_experts: bool = False
) -> None:
    """Name the shards, write the index and config.json, copy the source's tokenizer and other files, rename into
    place. exact_experts: experts differ in format, so targets name them one by one."""
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
        groups = tuple((CHOICES[c], (_module_pattern(n, exact_experts),)) for c, n in sorted(targets.items()))
        if isinstance(groups[0][0], (Mxfp4, Fp8Blocks)):
            groups = ((groups[0][0], ("Linear",)),)
        config["quantization_config"] = quantization_config(Scheme(groups))
    if float_dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(float_dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    skip = {"config.json", INDEX, SINGLE, mixed.CHOICE_FILE}
    for f in source.iterdir() if source is not None else ():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, tmp / f.name)
    for f in tmp.iterdir():
        fsync_path(f)
    os.rename(tmp, out)
    fsync_path(out.parent)
