"""ModelConfig <-> plain dicts (JSON, TOML): every field of the nested frozen dataclasses, so a config written next to
a checkpoint or in a training file rebuilds exactly, with the same validation as in code."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from moekit.config.attention import AttentionConfig, RopeScaling
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.routing.spec import RoutingSpec

NESTED = (ModelConfig, MoEConfig, RoutingSpec, ExpertLayout, AttentionConfig, RopeScaling)


def config_to_dict(cfg: Any) -> dict:
    """All fields of a config dataclass, recursively; tuples become lists. `extra` (loader notes) is left out."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name == "extra":
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_from_dict(cls: type, d: dict, where: str = "") -> Any:
    """cls(**d) with nested configs rebuilt from dicts and lists turned back into tuples. Unknown keys raise a
    ValueError naming them and the allowed ones (a misspelt field must not be silently ignored)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or cls.__name__}={d!r} is invalid: allowed a table of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
    unknown = sorted(set(d) - names)
    if unknown:
        field = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"{field} is not a {cls.__name__} field: allowed {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _convert(hints[name], value, f"{where + '.' if where else ''}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where or cls.__name__}: {e}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    for option in _options(hint):
        if option in NESTED and isinstance(value, dict):
            return config_from_dict(option, value, where)
        if typing.get_origin(option) is tuple and isinstance(value, list):
            return tuple(value)
    return value


def _options(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def model_config_from_dict(d: dict) -> ModelConfig:
    return config_from_dict(ModelConfig, d)
