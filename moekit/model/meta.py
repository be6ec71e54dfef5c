"""Building a model without memory or initialisation: on PyTorch's meta device (shapes only), for counting
parameters, and for loading checkpoints (materialise once, then fill from the files)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moekit.config.model import ModelConfig
from moekit.experts import huge_pages

_INITS = (
    "normal_",
    "uniform_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "trunc_normal_",
    "zeros_",
    "ones_",
    "constant_",
    "xavier_uniform_",
    "xavier_normal_",
)


@contextmanager
def no_init() -> Iterator[None]:
    """Make torch.nn.init a no-op: initialising meta tensors is pointless, and its first use imports torch's
    whole decomposition machinery (seconds and ~80 MB)."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def meta_model(cfg: ModelConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """The MoEDecoder of cfg on the meta device, its floating tensors in dtype (default: torch's default)."""
    from moekit.model.decoder import MoEDecoder

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with no_init(), torch.device("meta"):
            return MoEDecoder(cfg)
    finally:
        torch.set_default_dtype(previous)


def materialize(model: nn.Module, device: str = "cpu") -> nn.Module:
    """Give every meta tensor memory on `device`: uninitialised for parameters (a checkpoint fills them), zeros for
    buffers (running state such as routing loads; rotary frequencies are built on the CPU and are never meta).
    Tied tensors stay tied; large CPU parameters get huge pages (huge_pages.py). Unlike Module.to_empty it calls
    torch.empty/zeros directly, which needs no meta-tensor machinery (sympy, decompositions)."""
    made: dict[int, torch.Tensor] = {}

    def fresh(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            if not t.is_meta:
                made[id(t)] = t
            elif isinstance(t, nn.Parameter):
                made[id(t)] = nn.Parameter(huge_pages.empty(t.shape, t.dtype, device), t.requires_grad)
            else:
                made[id(t)] = torch.zeros(t.shape, dtype=t.dtype, device=device)
        return made[id(t)]

    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None:
                    tensors[name] = fresh(t)
    return model
