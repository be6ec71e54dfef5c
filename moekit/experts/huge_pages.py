"""Weights in 2 MB pages. Inference streams every weight it uses from memory; in 4 KB pages each 4 KB is its own
TLB miss, and a 200 MB expert stack streamed at 20-23 GB/s here against 27 GB/s in 2 MB pages. Large CPU weights
therefore get their own anonymous mapping, started on a 2 MB boundary and marked for transparent huge pages before
its first touch. Linux only; elsewhere, or with the system's THP mode set to 'never', the pages stay small and
nothing else changes. Set MOEKIT_HUGE_PAGES=0 to opt out."""

from __future__ import annotations

import math
import mmap
import os

import torch
from torch import nn

_HUGE_PAGE = 2**21


def _wanted(nbytes: int) -> bool:
    return nbytes >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("MOEKIT_HUGE_PAGES", "1") != "0"


def empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty, in huge pages when on the CPU and at least one huge page large."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or not _wanted(nbytes):
        return torch.empty(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the tensor keeps it
    region.madvise(mmap.MADV_HUGEPAGE)
    start = -torch.frombuffer(region, dtype=torch.uint8).data_ptr() % _HUGE_PAGE
    return torch.frombuffer(region, dtype=dtype, count=math.prod(shape), offset=start).view(shape)


@torch.no_grad()
def rehome(module: nn.Module) -> None:
    """Move each large CPU parameter of module into huge pages, in place (the Parameter objects stay the same).
    One that starts on a 2 MB boundary is taken as moved already (by chance: 1 in 32768 of malloc's)."""
    for p in module.parameters():
        movable = p.device.type == "cpu" and p.is_contiguous() and p.data_ptr() % _HUGE_PAGE != 0
        if movable and _wanted(p.numel() * p.element_size()):
            fresh = empty(p.shape, p.dtype)
            fresh.copy_(p)
            p.data = fresh
