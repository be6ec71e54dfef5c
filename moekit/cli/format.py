"""Number formats the commands share."""

from __future__ import annotations


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def count(n: float) -> str:
    """A parameter count in the unit that shows it: 1.234B, 5.67M, 890K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:,.0f}{unit}"
    return str(int(n))
