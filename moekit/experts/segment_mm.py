"""Segment matmul: rows of x sorted into contiguous per-expert segments, each multiplied by its expert's matrix.

On CPU, one torch matmul per expert leaves the second core idle for the small segments of MoE decode and
prefill (a gemv or a few-row gemm barely runs in parallel), so the segments are spread over a small pool of
single-threaded workers instead, each producing its own rows (or its own weight-gradient rows): no reduction
across workers, so results are bitwise deterministic. Backward is written out so it runs on the same pool.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from moekit.experts.gemv import segment_gemm

# Segments shorter than this are never split across workers: splitting would read the expert's weights twice.
_MIN_SPLIT_ROWS = 64
# Segments of at most this many rows go to moekit's few-row kernel (compute stays below the memory time up to
# about here on a 2-core AVX2 machine).
FEW_ROWS = 16
# Below this many rows a piece costs what reading its weights costs (memory-bound), whatever its row count:
# about where a CPU's FLOP rate per byte of bandwidth crosses over.
_MEMORY_BOUND_ROWS = 16


def _cost(rows: int, width: int) -> float:
    return max(rows, _MEMORY_BOUND_ROWS) * width


_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _workers() -> ThreadPoolExecutor | None:
    """A pool of single-threaded workers as large as torch's intra-op thread count (None when that is 1).
    Re-created after a fork (a child inherits no threads)."""
    global _pool
    n = torch.get_num_threads()
    if n <= 1:
        return None
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != n:
            _pool = (os.getpid(), n, ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,)))
        return _pool[2]


Task = tuple[float, Callable[[], None]]


def _run(tasks: list[Task]) -> None:
    """Run (cost, fn) tasks: longest first onto the least loaded worker, then wait for all."""
    pool = _workers()
    if pool is None or len(tasks) <= 1:
        _run_all([fn for _, fn in tasks])
        return
    n = torch.get_num_threads()
    bins: list[list[Callable[[], None]]] = [[] for _ in range(n)]
    loads = [0.0] * n
    for cost, fn in sorted(tasks, key=lambda t: -t[0]):
        i = loads.index(min(loads))
        bins[i].append(fn)
        loads[i] += cost
    # The caller only waits: running a share itself would put its multi-threaded matmuls beside the workers.
    futures = [pool.submit(_run_all, fns) for fns in bins if fns]
    for fut in futures:
        fut.result()


def _run_all(fns: list[Callable[[], None]]) -> None:
    # Grad mode is per thread: the workers must not record the out= matmuls for autograd.
    with torch.no_grad():
        for fn in fns:
            fn()


def _chunks(length: int, parts: int) -> list[tuple[int, int]]:
    step = math.ceil(length / max(parts, 1))
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def _row_pieces(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, row start, row end) pieces; long segments split so no worker idles while one works alone."""
    total = sum(counts)
    target = max(_MIN_SPLIT_ROWS, math.ceil(total / max(torch.get_num_threads(), 1)))
    pieces, start = [], 0
    for e, c in enumerate(counts):
        if c:
            pieces += [(e, start + a, start + b) for a, b in _chunks(c, math.ceil(c / target))]
        start += c
    return pieces


def _forward(x_SK: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e]^T ([E, N, K] weights) or @ w[e] ([E, K, N] when transposed)."""
    n_out = w.shape[-1] if transposed else w.shape[-2]
    y_SN = x_SK.new_empty(x_SK.shape[0], n_out)

    def piece(e: int, a: int, b: int) -> None:
        torch.mm(x_SK[a:b], w[e] if transposed else w[e].t(), out=y_SN[a:b])

    # Few-row segments (decode, small batches, the many small experts of fine-grained MoEs) are memory-bound:
    # moekit's kernel reads each weight row once for all their rows, at close to streaming speed, where a few-row
    # MKL gemm reaches about half of it. Longer segments go to the pool of single-threaded MKL workers.
    few, start = [], 0
    for e, c in enumerate(counts):
        if 0 < c <= FEW_ROWS and not transposed:
            few.append((e, start, c))
        start += c
    if few and not segment_gemm(w, x_SK, few, y_SN):
        few = []  # no kernel here: matmuls below
    if len(few) < sum(1 for c in counts if c):  # some segments are longer: MKL on the pool
        done = {e for e, _, _ in few}
        pieces = [p for p in _row_pieces(counts) if p[0] not in done]
        _run([(_cost(b - a, n_out), lambda e=e, a=a, b=b: piece(e, a, b)) for e, a, b in pieces])
    return y_SN


def _grad_input(dy_SN: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool) -> torch.Tensor:
    n_in = w.shape[-2] if transposed else w.shape[-1]
    dx_SK = dy_SN.new_empty(dy_SN.shape[0], n_in)

    def piece(e: int, a: int, b: int) -> None:
        torch.mm(dy_SN[a:b], w[e].t() if transposed else w[e], out=dx_SK[a:b])

    _run([(_cost(p[2] - p[1], n_in), lambda p=p: piece(*p)) for p in _row_pieces(counts)])
    return dx_SK


def _grad_weight(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool
) -> torch.Tensor:
    """dw[e] = dy_e^T x_e ([N, K]) or x_e^T dy_e ([K, N]); split along dw's rows so pieces never overlap."""
    dw = torch.empty_like(w)
    total = sum(counts) or 1
    workers = max(torch.get_num_threads(), 1)
    # Untouched experts get zero gradient; zeroing runs on the workers too (first touch of fresh pages is slow).
    tasks: list[Task] = [(w[e].numel() / 4, lambda e=e: dw[e].zero_()) for e, c in enumerate(counts) if c == 0]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        x_e, dy_e = x_SK[start : start + c], dy_SN[start : start + c]
        rows = dw.shape[1]
        parts = max(1, min(workers, round(workers * c / total))) if c >= _MIN_SPLIT_ROWS else 1
        for a, b in _chunks(rows, parts):
            if transposed:
                fn = lambda e=e, a=a, b=b, x_e=x_e, dy_e=dy_e: torch.mm(x_e[:, a:b].t(), dy_e, out=dw[e, a:b])
            else:
                fn = lambda e=e, a=a, b=b, x_e=x_e, dy_e=dy_e: torch.mm(dy_e[:, a:b].t(), x_e, out=dw[e, a:b])
            tasks.append((_cost(c, b - a), fn))
        start += c
    _run(tasks)
    return dw


class _SegmentMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SK, w, counts, transposed):  # type: ignore[override]
        ctx.save_for_backward(x_SK, w)
        ctx.counts, ctx.transposed = counts, transposed
        return _forward(x_SK.contiguous(), w, counts, transposed)

    @staticmethod
    def backward(ctx, dy_SN):  # type: ignore[override]
        x_SK, w = ctx.saved_tensors
        dy_SN = dy_SN.contiguous()
        dx = _grad_input(dy_SN, w, ctx.counts, ctx.transposed) if ctx.needs_input_grad[0] else None
        dw = _grad_weight(x_SK.contiguous(), dy_SN, w, ctx.counts, ctx.transposed) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def segment_mm(x_SK: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool = False) -> torch.Tensor:
    """x_SK rows sorted by expert (counts[e] rows for expert e) times w ([E, N, K], or [E, K, N] if transposed)."""
    counts = tuple(map(int, counts))
    if not (torch.is_grad_enabled() and (x_SK.requires_grad or w.requires_grad)):
        with torch.no_grad():
            return _forward(x_SK.contiguous(), w, counts, transposed)
    return _SegmentMatmul.apply(x_SK, w, counts, transposed)


def torch_grouped_mm(
    x_SK: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool = False
) -> torch.Tensor:
    """The same through torch's grouped matmul kernel (needs 16-byte aligned strides)."""
    offsets = torch.tensor(list(counts), device=x_SK.device).cumsum(0).to(torch.int32)
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    y_SN = grouped_mm(x_SK.contiguous(), w if transposed else w.transpose(-2, -1), offs=offsets)
    return _ContiguousGrad.apply(y_SN) if y_SN.requires_grad else y_SN


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped matmul's backward refuses an expanded one
    (the gradient of a sum, say)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()
