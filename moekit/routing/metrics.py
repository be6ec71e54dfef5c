"""Routing metrics from expert loads: MaxVio, normalised entropy, coefficient of variation, dead experts, drops."""

from __future__ import annotations

import math

import torch


def _as_float(counts_E: torch.Tensor | list[int] | list[float]) -> torch.Tensor:
    return torch.as_tensor(counts_E, dtype=torch.float64).reshape(-1)


def max_vio(counts_E: torch.Tensor | list[int]) -> float:
    """max load / mean load - 1 (Wang et al. 2024). 0 is perfect balance; E - 1 is everything on one expert."""
    c = _as_float(counts_E)
    mean = c.mean()
    return float(c.max() / mean - 1.0) if mean > 0 else 0.0


def load_entropy(counts_E: torch.Tensor | list[int]) -> float:
    """Entropy of the load distribution divided by log(E): 1 is uniform, 0 is a single expert."""
    c = _as_float(counts_E)
    if c.numel() <= 1 or c.sum() <= 0:
        return 1.0
    p = c / c.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(c.numel()))


def load_cv(counts_E: torch.Tensor | list[int]) -> float:
    """Coefficient of variation of the loads (population std / mean)."""
    c = _as_float(counts_E)
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


def dead_experts(counts_E: torch.Tensor | list[int]) -> int:
    """How many experts received no token."""
    return int((_as_float(counts_E) == 0).sum())


def routing_stats(counts_E: torch.Tensor | list[int], dropped: int = 0, assignments: int | None = None) -> dict:
    """All load metrics of one layer as a JSON-ready dict. assignments: routed (token, expert) pairs before drops."""
    c = _as_float(counts_E)
    total = int(c.sum()) + dropped if assignments is None else assignments
    return {
        "tokens_per_expert": [int(v) for v in c.tolist()],
        "max_vio": max_vio(c),
        "entropy": load_entropy(c),
        "cv": load_cv(c),
        "dead_experts": dead_experts(c),
        "dropped_fraction": dropped / total if total else 0.0,
    }
