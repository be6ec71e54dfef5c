"""The published configs that ship with moekit, and reading a config.json by path, directory or published name."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def published_names() -> list[str]:
    """The published configs that ship with moekit (usable by name)."""
    return sorted(
        p.name[:-5]
        for p in resources.files("moekit.config").joinpath("published").iterdir()
        if p.name.endswith(".json")
    )


def load_hf_config(name_or_path: str | Path) -> dict:
    """A config.json by path (file or model directory) or by the name of a shipped published config."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        if str(name_or_path) in published_names():
            text = resources.files("moekit.config").joinpath("published", f"{name_or_path}.json").read_text()
            return json.loads(text)
        raise ValueError(
            f"model {str(name_or_path)!r} is unknown: allowed a config.json path, a model directory, "
            f"or one of {', '.join(published_names())}"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
