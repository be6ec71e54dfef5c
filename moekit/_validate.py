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
