"""The checks every format's loader makes of the scales beside a quantized weight."""

from __future__ import annotations

import torch


def checked_scales(name: str, label: str, scale: torch.Tensor, expected: tuple, weight_shape, grouping: str):
    """The scales as fp32, after checking their shape is `expected` (the weight's grouping) and that they are finite;
    a ValueError naming the tensor otherwise."""
    if tuple(scale.shape) != tuple(expected):
        raise ValueError(
            f"{name}: {label} shape {list(scale.shape)} does not fit weight {list(weight_shape)} in {grouping}: "
            f"allowed {list(expected)}"
        )
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name}: {label} holds NaN or inf: allowed finite scales")
    return scale
