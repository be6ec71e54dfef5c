"""Shared measuring tools for the benchmarks: timing, the machine's read bandwidth and matmul rate."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

from moekit.experts import huge_pages
from moekit.kernels.probe import read_probe


def timeit(fn: Callable[[], object], min_reps: int = 3, budget_s: float = 2.0) -> float:
    """Median seconds of fn() after one warm-up call; repeats until min_reps and budget_s are both reached."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fastest(fn: Callable[[], object], reps: int = 5) -> float:
    """Best seconds of fn() over reps runs after one warm-up: for the floors, which are what the machine can do."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """Bytes per second of the best read of a large fp32 tensor this machine does (in huge pages, as moekit keeps its
    weights): all threads, each reading its share as four streams as moekit's kernels do (csrc/read_probe.cpp), or
    torch's sum where that is faster. A floor from a slower read would flatter whatever it judges."""
    x = huge_pages.empty((nbytes // 4,), torch.float32).fill_(1)
    best = nbytes / fastest(lambda: x.sum())
    if read_probe(x) is not None:
        best = max(best, nbytes / fastest(lambda: read_probe(x)))
    return best


def matmul_rate() -> float:
    """Dense fp32 FLOP/s, the best of a few large shapes."""
    best = 0.0
    for m, k, n in ((2048, 1024, 4096), (1024, 1024, 3584), (4096, 1024, 768)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        best = max(best, 2 * m * k * n / fastest(lambda a=a, b=b: a @ b))
    return best


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
