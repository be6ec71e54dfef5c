"""Training checkpoints: model, optimizer and RNG state as safetensors plus one JSON file, written atomically.

A checkpoint is a directory RUN/checkpoints/step-00000100/. It is written under a hidden temporary name, every
file fsynced, then renamed into place in one step: a crash at any moment leaves either the complete new checkpoint
or none, and the earlier ones untouched. No pickle anywhere: tensors in safetensors, the rest in JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moekit.checkpoint.files import fsync_path

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "trainer.json"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted saves are not listed)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE).is_file())


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict,
    state: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest keep_last. model and optimizer: the
    modules, or their state dicts (an expert-parallel run's, gathered). state: JSON-ready trainer state (step,
    configs, ...). Returns the checkpoint directory."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # clones: tied or shared storages are refused by safetensors
        held = model if isinstance(model, dict) else model.state_dict()
        weights = {k: v.detach().clone().contiguous() for k, v in held.items()}
        save_file(weights, str(tmp / MODEL), metadata={"format": "pt"})
        tensors, meta = _optimizer_tensors(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / OPTIMIZER), metadata={"format": "pt"})
        (tmp / STATE).write_text(json.dumps({**state, "optimizer": meta}, indent=1))
        for f in (MODEL, OPTIMIZER, STATE):
            fsync_path(tmp / f)
        if final.exists():  # the same step saved again: move the old one aside first
            old = root / f".step-{step:08d}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, check=None, local=None
) -> dict:
    """Restore model (and optimizer, RNG) from a checkpoint directory; returns the trainer state. check(state, path),
    if given, runs on the trainer state before anything is loaded (and raises to refuse the checkpoint). local,
    if given, maps the stored (weights, optimizer state dict) to this process's share (expert parallelism)."""
    path = Path(path)
    for f in (MODEL, OPTIMIZER, STATE):
        if not (path / f).is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {f} is missing")
    try:
        state = json.loads((path / STATE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path} is unreadable ({e})") from None
    if check is not None:
        check(state, path)
    try:
        weights = load_file(str(path / MODEL))
        tensors = load_file(str(path / OPTIMIZER))
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"checkpoint {path} is unreadable ({e})") from None
    optimizer_state = _optimizer_state(tensors, state.pop("optimizer"))
    if local is not None:
        weights, optimizer_state = local(weights, optimizer_state)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ValueError(f"checkpoint {path} does not fit this model ({what})")
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(tensors["rng.torch"])
    return state
