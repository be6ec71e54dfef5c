"""One place for argument checks, so every bad value fails the same way: a ValueError naming the field and the
allowed range."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field}={value!r} is invalid: allowed {allowed}")


def check_int(field: str, value: Any, lo: int, hi: int | None = None) -> int:
    """An integer in [lo, hi] (hi=None: unbounded)."""
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        fail(field, value, allowed)
    if value < lo or (hi is not None and value > hi):
        fail(field, value, allowed)
    return value


def check_float(
    field: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    """A finite number in [lo, hi] ((lo, hi] when lo_open)."""
    left = "(" if lo_open else "["
    allowed = f"a finite number in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(field, value, allowed)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        fail(field, value, allowed)
    if hi is not None and value > hi:
        fail(field, value, allowed)
    return float(value)


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        fail(field, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(field: str, value: Any, bare: str = "bytes") -> tuple[float, str]:
    """(number, unit) of a size such as 8GB, 512MiB or a bare number; returns (bytes, '') when a unit is given,
    (the number, bare) when not (the caller decides what a bare number counts: bytes, or experts)."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = m[2].lower() if m else ""
    if not m or (unit and unit not in SIZE_UNITS) or m[1].count(".") > 1:
        fail(field, value, f"bytes with a unit (8GB, 512MiB) or a bare number of {bare}")
    return (float(m[1]) * SIZE_UNITS[unit], "") if unit else (float(m[1]), bare)
