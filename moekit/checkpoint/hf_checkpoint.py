"""Load and save Hugging Face model directories (config.json + safetensors, sharded or not).

Loading builds the model on the `meta` device, allocates it once in the target dtype and reads each tensor from
the files straight into its place, so peak memory stays near the model's own size. Per-expert checkpoint tensors are
stacked into moekit's [E, 2F, D] / [E, D, F] layout by the family's declared ExpertKeys, and split back on save.
Saving writes every file to a temporary name, fsyncs it and renames it into place."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit.checkpoint.expert_files import expert_pieces
from moekit.checkpoint.export import hf_family_for
from moekit.checkpoint.files import INDEX, SINGLE, Shards, checkpoint_dir, weight_map, write_atomic
from moekit.checkpoint.keymap import KeyMap
from moekit.checkpoint.names import piece_view
from moekit.checkpoint.quantized import PART_DTYPES, install, load_targets, quantized_targets, scheme_of
from moekit.config.model import ModelConfig
from moekit.config.published import load_hf_config
from moekit.config.serialize import config_to_dict
from moekit.experts.mixed import MixedExperts
from moekit.experts.on_disk import ExpertsOnDisk
from moekit.families import FAMILIES, NATIVE, family_of, model_from_hf, tensor_names
from moekit.model.decoder import MoEDecoder
from moekit.model.meta import materialize, meta_model
from moekit.quant.choices import parse_weights
from moekit.quant.held import QuantizedModule
from moekit.version import __version__

LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    experts_on_disk: bool = False,
) -> MoEDecoder:
    """The model in a Hugging Face directory; dtype None keeps the checkpoint's. quantize: a `moekit quantize
    --weights` spec ("rest=q8", "attention=q8,head=q4") for the float modules, quantized tensor by tensor as they
    are read (never all held in float); what the files hold quantized stays as it is. experts_on_disk: the main
    layers' routed experts are not read: each such layer holds an ExpertsOnDisk saying where their bytes lie (for
    moekit.infer.expert_cache). model.load_notes lists what the loader decided that a user should know (e.g. a
    config announcing MTP layers the files do not hold)."""
    path = checkpoint_dir(path)
    hf, files, shards, notes = open_checkpoint(path)
    cfg = model_from_hf(hf, name=path.name)
    if hf.get("model_type") != NATIVE:  # saved again as the same family; moekit's own format is rewritten
        cfg = replace(cfg, extra={**cfg.extra, "hf_config": hf})
    if cfg.mtp_layers and not any(re.match(rf"model\.layers\.{cfg.num_layers}\.", n) for n in files):
        notes.append(f"config announces {cfg.mtp_layers} multi-token-prediction layer(s) the files do not hold")
        cfg = replace(cfg, mtp_layers=0)
    elif cfg.mtp_layers:
        notes.append(f"loaded {cfg.mtp_layers} multi-token-prediction layer(s) (used by training and speculation)")
    scheme = scheme_of(hf, shards)
    floats = [n for n in files if scheme is None or not scheme.is_part(n)]  # a bf16 scale says nothing of the rest
    model = meta_model(cfg, _resolve_dtype(dtype, shards, floats))
    keymap = KeyMap(cfg, tensor_names(cfg.family))
    targets = quantized_targets(scheme, files, keymap) if scheme is not None else {}
    if targets:
        install(model, targets)
        held = sorted({t.fmt.name for t in targets.values()})
        notes.append(f"{len(targets)} module(s) hold {' / '.join(held)} weights, kept quantized")
    if experts_on_disk:
        files = _leave_experts_on_disk(model, keymap, shards, files, quantize)
    on_load = load_targets(model, keymap, quantize, targets) if quantize else {}
    transposed = {p for p, t in on_load.items() if t.kind == "experts" and model.get_submodule(p).layout.transposed}
    if on_load:
        install(model, on_load)
        made = sorted({t.fmt.name for t in on_load.values()})
        notes.append(f"{len(on_load)} module(s) quantized to {' / '.join(made)} while loading")
    model = materialize(model)
    quantizing = {p: model.get_submodule(p) for p in on_load}
    _fill(model, keymap, shards, files, quantizing, transposed)
    if scheme is not None:
        _check_quantized(model, keymap, path)
    model.load_notes = notes
    return model.eval()


def _leave_experts_on_disk(model, keymap: KeyMap, shards: Shards, files: dict, quantize) -> dict:
    """Swap the main layers' routed experts (float, or one quantized format) for ExpertsOnDisk, with where each
    expert's bytes lie; the files left to read now."""
    cfg = model.config
    blocks = {i: b for i, b in model.moe_blocks().items() if i < cfg.num_layers}
    if not blocks:
        raise ValueError("expert offloading: the model has no MoE layers")
    if quantize and parse_weights(quantize)["experts"] != "keep":
        raise ValueError(f"quantize={quantize!r}: experts left on disk are read as stored: allowed the other classes")
    for i, block in blocks.items():
        held = block.experts
        if isinstance(held, MixedExperts):
            raise ValueError(f"expert offloading: layer {i}'s experts are stored in several formats (not supported)")
        fmt = getattr(held, "fmt", None)
        if fmt is not None and fmt.derived(held.piece_shape("down_proj", True)):
            raise ValueError(f"expert offloading: {fmt.name} experts (parts derived from the shape) are not supported")
        block.experts = ExpertsOnDisk.like(held)
    first = next(iter(blocks.values())).experts
    layers = {i: b.experts.num_experts for i, b in blocks.items()}
    pieces = expert_pieces(shards, keymap, first.part_specs(), layers)
    read_later = {p.name for found in pieces.values() for p in found}
    for (layer, expert), found in pieces.items():
        blocks[layer].experts.pieces[expert] = found
    return {name: file for name, file in files.items() if name not in read_later}


def open_checkpoint(path: Path) -> tuple[dict, dict[str, Path], Shards, list[str]]:
    """(config.json of the language model, {tensor name: file}, the files, notes) of a model directory. A
    multimodal wrapper (Kimi K2.5) gives its language model's config and tensors under that family's names; the
    tensors of other parts are left out, and a note says so."""
    hf = load_hf_config(path)
    if hf.get("model_type") == NATIVE:
        files = weight_map(path)
        return hf, files, Shards(files), []
    family = family_of(hf)  # a family moekit can run, or a ValueError listing them
    files = weight_map(path)
    ours = {stored: family.tensor_name(hf, stored) for stored in files}
    left = [stored.removeprefix("model.") for stored, name in ours.items() if name is None]
    parts = ", ".join(sorted({n.split(".")[0] for n in left}))
    notes = [f"{len(left)} tensors of {parts}: not loaded (moekit runs the language model)"] if left else []
    stored = {name: s for s, name in ours.items() if name is not None}
    renamed = {name: s for name, s in stored.items() if name != s}
    files = {name: files[s] for name, s in stored.items()}
    return family.language_model(hf), files, Shards(files, renamed), notes


def _resolve_dtype(dtype, shards: Shards, names) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype not in LOAD_DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid: allowed one of {', '.join(LOAD_DTYPES)}")
        return LOAD_DTYPES[dtype]
    found = {shards.dtype(name) for name in names}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # the checkpoint's own (the narrowest, if mixed)
        if dtype in found:
            return dtype
    return torch.float32


def _fill(
    model: MoEDecoder,
    keymap: KeyMap,
    shards: Shards,
    files: dict,
    quantizing: dict[str, QuantizedModule],
    transposed: set[str],
) -> None:
    """Read every checkpoint tensor into its place; float tensors of the modules in `quantizing` are quantized into
    their parts (those in `transposed` are stacked experts the files hold input-major)."""
    cfg = model.config
    experts = keymap.experts
    targets = model.state_dict(keep_vars=True)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedModule)}
    mixed = {n: m for n, m in model.named_modules() if isinstance(m, MixedExperts)}
    filled: set[str] = set()
    pattern = experts.pattern() if experts.per_expert else None
    for name in files:
        pieces = keymap.fused_pieces(name)
        if pieces is not None:
            _fill_fused(targets, pieces, shards, name, files)
            filled.update(target for target, _ in pieces)
            continue
        m = pattern.match(name) if pattern else None
        if m:
            layer, e, proj, part = m[1], int(m[2]), m[3], m[4]
            which = {experts.gate: "gate", experts.up: "up", experts.down: "down"}[proj]
            module = keymap.to_moekit(f"{layer}.mlp.experts.gate_up_proj").removesuffix(".gate_up_proj")
            if module in mixed:  # the expert's own format's group, at its slot there
                group, e = mixed[module].place_E[e] if e < mixed[module].num_experts else (0, e)
                module = f"{module}.groups.{group}"
            target_name = f"{module}.{'down_proj' if which == 'down' else 'gate_up_proj'}{part}"
            if _derived(quantized, target_name, shards, name, files, piece=True):
                continue
            target = _target(targets, target_name, name, files)
            if e >= target.shape[0]:
                raise ValueError(f"{files[name]}: {name} names expert {e}, the config has {target.shape[0]}")
            half = target.shape[1] // 2  # gate and up: the two halves of each row-indexed part
            view = {"gate": lambda t: t[e, :half], "up": lambda t: t[e, half:], "down": lambda t: t[e]}[which]
            _copy(view(target.data), shards, name, files)
            filled.add(f"{target_name}#{e}{which}")
            continue
        target_name = keymap.to_moekit(name)
        if target_name is None:  # a copy of a shared tensor (DeepSeek's MTP embedding/head)
            continue
        if target_name not in targets and _derived(quantized, target_name, shards, name, files):
            continue
        module_name, _, base = target_name.rpartition(".")
        owner = quantizing.get(module_name)
        if owner is not None and base in owner.held_weights():
            _quantize_into(owner, base, module_name in transposed, shards, name, files)
            filled.update(f"{target_name}{suffix}" for suffix in owner.fmt.parts(*owner.held(base)))
            continue
        _copy(_target(targets, target_name, name, files).data, shards, name, files)
        filled.add(target_name)
    missing = []
    for target_name, tensor in targets.items():
        if target_name in filled:
            continue
        m = _STACKED_EXPERTS.search(target_name) if pattern else None
        if m:
            parts = ("down",) if m[2] == "down_proj" else ("gate", "up")
            lost = [f"{e}{p}" for e in range(tensor.shape[0]) for p in parts if f"{target_name}#{e}{p}" not in filled]
            if not lost:
                continue
        if cfg.tie_embeddings and target_name == "lm_head.weight":
            continue
        missing.append(keymap.to_hf(target_name))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{next(iter(files.values())).parent}: missing tensors {', '.join(missing[:3])}{more}")


# moekit's stacked expert tensors (and their quantized parts) that per-expert checkpoints fill expert by expert
# (MixedExperts hold them per format: experts.groups.G.gate_up_proj...)
_STACKED_EXPERTS = re.compile(r"experts\.(?:groups\.(\d+)\.)?(gate_up_proj|down_proj)(|_(?!bias$)[a-z_]+)$")


def _derived(quantized: dict, target_name: str, shards, name: str, files: dict, piece: bool = False) -> bool:
    """Whether checkpoint tensor `name` (moekit's `target_name`) is a part a quantized module derives from its
    shape (INT4's weight_shape): then it is checked against the shape, not held. piece: the tensor is one expert's
    (one piece of a stacked weight)."""
    module, _, attr = target_name.rpartition(".")
    owner = quantized.get(module)
    if owner is None:
        return False
    base = next((b for b in owner.held_weights() if attr.startswith(b)), None)
    expected = owner.fmt.derived(owner.piece_shape(base, piece)).get(attr[len(base) :]) if base else None
    if expected is None:
        return False
    found = shards.read(name)
    if found.shape != expected.shape or not torch.equal(found.to(expected.dtype), expected):
        raise ValueError(f"{files[name]}: {name} is {found.tolist()}, the config implies {expected.tolist()}")
    return True


def _quantize_into(owner: QuantizedModule, base: str, transposed: bool, shards, name: str, files: dict) -> None:
    """Quantize checkpoint tensor `name` into weight `base` of owner, reading it a slice at a time (one expert, or
    a block of rows) so that no float copy of the whole is ever made; transposed: stacked experts the files hold
    input-major."""
    shape = shards.shape(name)
    held, _ = owner.held(base)
    expected = (held[0], held[2], held[1]) if transposed else held
    if shape != expected:
        raise ValueError(f"{files[name]}: tensor {name!r} has shape {list(shape)}, the config implies {list(expected)}")
    step = owner.store_step(base)
    for start in range(0, shape[0], step):
        w = shards.read_rows(name, start, min(start + step, shape[0]))
        owner.store_rows(base, start, w.transpose(1, 2) if transposed else w)


def _check_quantized(model: MoEDecoder, keymap: KeyMap, path: Path) -> None:
    """The formats' checks of every quantized module's scales, errors naming the checkpoint tensor."""
    for module_name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            module.check_parts(lambda base, m=module_name: f"{path}: {keymap.to_hf(f'{m}.{base}')}")


def _fill_fused(targets: dict, pieces: list, shards: Shards, name: str, files: dict) -> None:
    """Split one fused checkpoint tensor into its pieces: rows in order, each reshaped to its view."""
    views = [piece_view(_target(targets, target, name, files).data, view) for target, view in pieces]
    rows = [v.numel() // v.shape[-1] for v in views]
    shape = shards.shape(name)
    if len(shape) != 2 or shape[0] != sum(rows) or shape[1] != views[0].shape[-1]:
        implied = [sum(rows), views[0].shape[-1]]
        raise ValueError(f"{files[name]}: tensor {name!r} has shape {list(shape)}, the config implies {implied}")
    source = shards.read(name)
    with torch.no_grad():
        for view, part in zip(views, source.split(rows), strict=True):
            view.copy_(part.view(view.shape))


def _target(targets: dict, target_name: str, name: str, files: dict) -> torch.Tensor:
    if target_name not in targets:
        raise ValueError(f"{files[name]}: unexpected tensor {name!r} (this config has no such weight)")
    return targets[target_name]


def _copy(dst: torch.Tensor, shards: Shards, name: str, files: dict) -> None:
    shape = shards.shape(name)
    if shape != tuple(dst.shape):
        raise ValueError(
            f"{files[name]}: tensor {name!r} has shape {list(shape)}, the config implies {list(dst.shape)}"
        )
    found = shards.dtype(name)
    if found != dst.dtype and (dst.dtype in PART_DTYPES or found in PART_DTYPES):  # quantized bytes never convert
        raise ValueError(f"{files[name]}: tensor {name!r} is {found}, the checkpoint's format holds it as {dst.dtype}")
    with torch.no_grad():
        shards.read_into(name, dst)


def save_pretrained(model: MoEDecoder, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors in the family's checkpoint layout (sharded above max_shard_bytes, with
    model.safetensors.index.json). Each file is written under a temporary name, fsynced, then renamed."""
    if any(isinstance(m, ExpertsOnDisk) for m in model.modules()):
        raise ValueError(
            "this model reads its routed experts from its checkpoint as it runs (expert_memory): "
            "save a model loaded without an expert memory budget"
        )
    hf = hf_config_of(model.config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model, hf["model_type"])
    shards = _shard(tensors, max_shard_bytes)
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for file, shard in zip(names, shards, strict=True):
        # clones: split experts and tied copies share storage, which safetensors refuses; one shard at a time
        owned = {k: v.clone() for k, v in shard.items()}
        write_atomic(path / file, lambda tmp, owned=owned: save_file(owned, str(tmp), metadata={"format": "pt"}))
        del owned
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {n: file for file, shard in zip(names, shards, strict=True) for n in shard},
        }
        write_atomic(path / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    else:
        (path / INDEX).unlink(missing_ok=True)
    for stale in path.glob("model*.safetensors"):  # shards of an earlier save with a different count
        if stale.name not in names:
            stale.unlink()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = {**hf, "torch_dtype": dtype, "dtype": dtype}
    write_atomic(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


def hf_config_of(cfg: ModelConfig) -> dict:
    """The config.json of a model: the one it was loaded with; else that of the Hugging Face family computing the
    same thing (a model built or trained in moekit, transformers loads it); else moekit's own format (model_type
    "moekit", the whole ModelConfig under "moekit_config"; only moekit loads it)."""
    hf = cfg.extra.get("hf_config")
    if hf is not None:
        if cfg.family not in FAMILIES:
            allowed = ", ".join(FAMILIES)
            raise ValueError(f"model_type={cfg.family!r} is unsupported for saving: allowed one of {allowed}")
        return hf
    family, hf = hf_family_for(cfg)
    if family is not None:
        return {**hf, "moekit_version": __version__}
    return {"model_type": NATIVE, "moekit_version": __version__, "moekit_config": config_to_dict(cfg)}


def checkpoint_tensors(model: MoEDecoder, family: str | None = None) -> dict[str, torch.Tensor]:
    """{checkpoint name: tensor} in the layout of `family` (default: the model's own; per-expert tensors split out
    of the stacked ones)."""
    cfg = model.config if family is None else replace(model.config, family=family)
    keymap = KeyMap(cfg, tensor_names(cfg.family))
    experts = keymap.experts
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    fused: set[str] = set()
    for hf_name, pieces in keymap.fused_names().items():
        if any(target not in state for target, _ in pieces):  # a layer without that part (a dense layer's router)
            continue
        views = [piece_view(state[target], view) for target, view in pieces]
        out[hf_name] = torch.cat([v.reshape(-1, v.shape[-1]) for v in views])
        fused.update(target for target, _ in pieces)
    for name, tensor in state.items():
        if (cfg.tie_embeddings and name == "lm_head.weight") or name in fused:
            continue
        m = _STACKED_EXPERTS.search(name) if experts.per_expert else None
        if m:
            module = name[: m.start()] + "experts"
            prefix = keymap.to_hf(f"{module}.{m[2]}")
            prefix = prefix[: prefix.index(".mlp.experts.")]
            ids = range(tensor.shape[0]) if m[1] is None else model.get_submodule(module).members[int(m[1])]
            half = tensor.shape[1] // 2
            for slot, e in enumerate(ids):
                keys = {p: k + m[3] for p, k in experts.names(prefix, e).items()}
                if m[2] == "gate_up_proj":
                    out[keys["gate"]], out[keys["up"]] = tensor[slot, :half], tensor[slot, half:]
                else:
                    out[keys["down"]] = tensor[slot]
            continue
        out[keymap.to_hf(name)] = tensor
    out.update(_derived_parts(model, keymap))
    for copy in keymap.mtp_copies():  # DeepSeek-V3 files keep the embedding and head beside each MTP layer
        out[copy] = model.embed_tokens.weight if copy.endswith("embed_tokens.weight") else model.lm_head.weight
    return {k: v.detach().contiguous() for k, v in out.items()}


def _derived_parts(model: MoEDecoder, keymap: KeyMap) -> dict[str, torch.Tensor]:
    """The parts quantized modules derive from their shapes (INT4's weight_shape), under their checkpoint names."""
    out: dict[str, torch.Tensor] = {}
    experts = keymap.experts
    for module_name, module in model.named_modules():
        if not isinstance(module, QuantizedModule):
            continue
        group = re.match(r"(.*\.experts)\.groups\.(\d+)$", module_name)  # one format's experts of MixedExperts
        owner = group[1] if group else module_name
        per_expert = experts.per_expert and owner.endswith(".experts")
        ids = model.get_submodule(owner).members[int(group[2])] if group else range(getattr(module, "num_experts", 0))
        for base in module.held_weights():
            for suffix, part in module.fmt.derived(module.piece_shape(base, per_expert)).items():
                if not per_expert:
                    out[keymap.to_hf(f"{module_name}.{base}{suffix}")] = part
                    continue
                hf_name = keymap.to_hf(f"{owner}.{base}")
                prefix = hf_name[: hf_name.index(".mlp.experts.")]
                for e in ids:
                    keys = experts.names(prefix, e)
                    for p in ("down",) if base == "down_proj" else ("gate", "up"):
                        out[keys[p] + suffix] = part
    return out


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards
