"""A memory-read probe for the benchmarks' floors (csrc/read_probe.cpp): the sum of a large fp32 tensor, each thread
reading its share as four streams, the way moekit's kernels read weights."""

from __future__ import annotations

import torch

from moekit.kernels.build import kernel_taking


def read_probe(x: torch.Tensor) -> float | None:
    """The sum of x (fp32, contiguous, on the CPU) read by the probe kernel; None where the kernel is not built."""
    kernel = kernel_taking(x) if x.is_contiguous() else None
    return None if kernel is None else kernel.read_probe(x, torch.get_num_threads())
