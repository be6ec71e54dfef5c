"""The published model families: one module per family, each exposing FAMILY (a moekit.families.base.Family), found
here by discovery, so adding a family is one new module (and its tests). model_from_hf reads any config.json: a
known family exactly, moekit's own format, or another MoE from the common field names (moekit.families.generic)."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace
from pathlib import Path

from moekit.checkpoint.names import TensorNames
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.config.published import load_hf_config
from moekit.families.base import Family
from moekit.families.generic import read_generic

NATIVE = "moekit"  # model_type of moekit's own format: a config no Hugging Face family computes exactly


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, Family):
            found[family.model_type] = family
    return found


FAMILIES: dict[str, Family] = _discover()
_BY_ALIAS = {alias: f for f in FAMILIES.values() for alias in (f.model_type, *f.aliases)}


def get_family(model_type: str) -> Family:
    """The family of a model_type (or one of its aliases), or a ValueError listing the known ones."""
    if model_type not in _BY_ALIAS:
        raise ValueError(f"model_type={model_type!r} is unsupported: allowed one of {', '.join(FAMILIES)}")
    return _BY_ALIAS[model_type]


def tensor_names(model_type: str) -> TensorNames:
    """How checkpoints of a model_type name their tensors (moekit's own format: the default names)."""
    return get_family(model_type).names if model_type != NATIVE else TensorNames()


def model_type_of(hf: dict) -> str | None:
    """The model_type whose family reads hf: the wrapper's own where moekit knows it (Kimi K2.5), else the language
    model's (inside text_config for multimodal wrappers)."""
    if hf.get("model_type") in _BY_ALIAS:
        return hf["model_type"]
    text = hf.get("text_config")
    return (text.get("model_type") if isinstance(text, dict) else None) or hf.get("model_type")


def family_of(hf: dict) -> Family:
    """The family of a config.json, or a ValueError listing the known ones."""
    return get_family(model_type_of(hf))


def moe_from_hf(hf: dict) -> tuple[MoEConfig, tuple[int, ...], int | None]:
    """(MoEConfig, MoE layer indices, dense FFN width) of a published family's config."""
    family = family_of(hf)
    return family.moe(family.fields(hf))


def model_from_hf(hf: dict, name: str = "", assumptions: list[str] | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face config. A known family is read exactly; any other MoE config is read from
    the common field names, and each guess is appended to `assumptions` (a list the caller passes in). A config
    lacking essential fields raises ValueError naming them."""
    if hf.get("model_type") == NATIVE:
        from moekit.config.serialize import model_config_from_dict

        if not isinstance(hf.get("moekit_config"), dict):
            raise ValueError("config.json has model_type 'moekit' but no moekit_config table")
        return replace(model_config_from_dict(hf["moekit_config"]), name=name)
    model_type = model_type_of(hf)
    if model_type not in _BY_ALIAS:
        text = hf.get("text_config")
        fields = text if isinstance(text, dict) else hf
        return read_generic(fields, name, assumptions if assumptions is not None else [], FAMILIES)
    return _BY_ALIAS[model_type].read(hf, name)


def load_model_config(name_or_path: str | Path, assumptions: list[str] | None = None) -> ModelConfig:
    """The ModelConfig of a published name, a config.json path or a model directory."""
    path = Path(str(name_or_path))
    name = path.stem if path.suffix == ".json" else path.name  # "deepseek-v3.2" is a name, not a file's stem
    return model_from_hf(load_hf_config(name_or_path), name, assumptions)


__all__ = [
    "FAMILIES",
    "NATIVE",
    "Family",
    "family_of",
    "get_family",
    "load_model_config",
    "model_from_hf",
    "tensor_names",
]
