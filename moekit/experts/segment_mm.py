"""Segment matmul: rows of x sorted into contiguous per-expert segments, each multiplied by its expert's matrix.

On CPU, one torch matmul per expert leaves the second core idle for the small segments of MoE decode and
prefill (a gemv or a few-row gemm barely runs in parallel), so the segments' products are spread over torch's own
OpenMP threads instead, one single-threaded product per task (csrc/parallel_mm.cpp), each producing its own rows
(or its own weight-gradient rows): no reduction across threads, so results are bitwise deterministic. On torch's
own threads, not a pool of Python threads, whose cores the OpenMP threads of the torch ops in between would spin on.
Backward is written out so it runs the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from moekit.kernels import (
    GRAD_WEIGHT_ROWS,
    INPUT_MAJOR_ROWS,
    TILED_ROWS,
    load_kernel,
    segment_gemm,
    segment_gemm_input_major,
    segment_grad_weight,
)

# Segments shorter than this are never split across threads: splitting would read the expert's weights twice.
_MIN_SPLIT_ROWS = 64
# Below this many rows a piece costs what reading its weights costs (memory-bound), whatever its row count:
# about where a CPU's FLOP rate per byte of bandwidth crosses over.
_MEMORY_BOUND_ROWS = 16


def _cost(rows: int, width: int) -> float:
    return max(rows, _MEMORY_BOUND_ROWS) * width


# (cost, a, b, out): out = a @ b
Product = tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]


def _run(products: list[Product], zeros: Sequence[torch.Tensor] = ()) -> None:
    """Every out = a @ b product and zero fill, each on one thread, the costliest first; serially (each product
    multi-threaded) with one thread or no kernel."""
    products = sorted(products, key=lambda p: -p[0])
    a, b, out = ([p[i] for p in products] for i in (1, 2, 3))
    threads = torch.get_num_threads()
    kernel = load_kernel() if threads > 1 and all(t.is_cpu for t in a + b) else None
    if kernel is not None:
        kernel.mm_tasks(a, b, out, list(zeros), threads)
        return
    with torch.no_grad():
        for a_i, b_i, out_i in zip(a, b, out, strict=True):
            torch.mm(a_i, b_i, out=out_i)
        for z in zeros:
            z.zero_()


def _chunks(length: int, parts: int) -> list[tuple[int, int]]:
    step = math.ceil(length / max(parts, 1))
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def _segments(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, row count) of every expert, the untouched ones included."""
    starts = itertools.accumulate(counts, initial=0)
    return [(e, start, c) for e, (start, c) in enumerate(zip(starts, counts, strict=False))]  # starts ends one later


def _row_pieces(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, row start, row end) pieces; long segments split so no thread idles while one works alone."""
    target = max(_MIN_SPLIT_ROWS, math.ceil(sum(counts) / max(torch.get_num_threads(), 1)))
    return [
        (e, start + a, start + b)
        for e, start, c in _segments(counts)
        if c
        for a, b in _chunks(c, math.ceil(c / target))
    ]


def _forward(x_SI: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e]^T ([E, O, I] weights) or @ w[e] ([E, I, O] when transposed)."""
    n_out = w.shape[-1] if transposed else w.shape[-2]
    return _products(x_SI, w, counts, n_out, input_major=transposed)


def _grad_input(dy_SO: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool) -> torch.Tensor:
    n_in = w.shape[-2] if transposed else w.shape[-1]
    # dx = dy @ w[e] for output-major weights, which makes them input-major for this product, and the other way round
    return _products(dy_SO, w, counts, n_in, input_major=not transposed)


def _products(
    x_SI: torch.Tensor, w: torch.Tensor, counts: Sequence[int], n_out: int, input_major: bool
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e] (input_major: w [E, I, O]) or @ w[e]^T ([E, O, I])."""
    y_SO = x_SI.new_empty(x_SI.shape[0], n_out)
    # Short segments (decode, small batches, the many small experts of fine-grained MoEs): MKL's gemm would spend
    # much of their time packing weights it uses for a few rows; moekit's kernels read them in place, each weight
    # row once for all the rows of its segment. Longer segments are single-threaded MKL products, one per thread.
    kernel, most_rows = (segment_gemm_input_major, INPUT_MAJOR_ROWS) if input_major else (segment_gemm, TILED_ROWS)
    short = [(e, a, c) for e, a, c in _segments(counts) if 0 < c <= most_rows]
    if short and not kernel(w, x_SI, short, y_SO):
        short = []  # no kernel here: matmuls below
    if len(short) < sum(1 for c in counts if c):
        done = {e for e, _, _ in short}
        pieces = [p for p in _row_pieces(counts) if p[0] not in done]
        _run([(_cost(b - a, n_out), x_SI[a:b], w[e] if input_major else w[e].t(), y_SO[a:b]) for e, a, b in pieces])
    return y_SO


def _grad_weight(
    x_SI: torch.Tensor, dy_SO: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool
) -> torch.Tensor:
    """dw[e] = dy_e^T x_e ([O, I]) or x_e^T dy_e ([I, O]); split along dw's rows so pieces never overlap."""
    dw = torch.empty_like(w)
    # Both layouts are dw[e] = b_e^T a_e: input-major weights trade x and dy's places.
    a_S, b_S = (dy_SO, x_SI) if transposed else (x_SI, dy_SO)
    # Segments up to GRAD_WEIGHT_ROWS (and untouched experts: zeros) go to moekit's kernel, which writes every dw row
    # once; longer ones are MKL products, split along dw's rows.
    short = [seg for seg in _segments(counts) if seg[2] <= GRAD_WEIGHT_ROWS]
    if short and not segment_grad_weight(a_S, b_S, short, dw):
        short = []
    done = {e for e, _, _ in short}
    total = sum(counts) or 1
    threads = max(torch.get_num_threads(), 1)
    products: list[Product] = []
    for e, start, c in _segments(counts):
        if c == 0 or e in done:
            continue
        a_e, b_e = a_S[start : start + c], b_S[start : start + c]
        parts = max(1, min(threads, round(threads * c / total))) if c >= _MIN_SPLIT_ROWS else 1
        for lo, hi in _chunks(dw.shape[1], parts):
            products.append((_cost(c, hi - lo), b_e[:, lo:hi].t(), a_e, dw[e, lo:hi]))
    # Untouched experts get zero gradient, zeroed on the threads too (first touch of fresh pages is slow).
    _run(products, [dw[e] for e, c in enumerate(counts) if c == 0 and e not in done])
    return dw


class _SegmentMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SI, w, counts, transposed):  # type: ignore[override]
        ctx.save_for_backward(x_SI, w)
        ctx.counts, ctx.transposed = counts, transposed
        return _forward(x_SI.contiguous(), w, counts, transposed)

    @staticmethod
    def backward(ctx, dy_SO):  # type: ignore[override]
        x_SI, w = ctx.saved_tensors
        dy_SO = dy_SO.contiguous()
        dx = _grad_input(dy_SO, w, ctx.counts, ctx.transposed) if ctx.needs_input_grad[0] else None
        dw = _grad_weight(x_SI.contiguous(), dy_SO, w, ctx.counts, ctx.transposed) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def segment_mm(x_SI: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool = False) -> torch.Tensor:
    """x_SI rows sorted by expert (counts[e] rows for expert e) times w ([E, O, I], or [E, I, O] if transposed)."""
    counts = tuple(map(int, counts))
    if not (torch.is_grad_enabled() and (x_SI.requires_grad or w.requires_grad)):
        with torch.no_grad():
            return _forward(x_SI.contiguous(), w, counts, transposed)
    return _SegmentMatmul.apply(x_SI, w, counts, transposed)


def torch_grouped_mm(
    x_SI: torch.Tensor, w: torch.Tensor, counts: Sequence[int], transposed: bool = False
) -> torch.Tensor:
    """The same through torch's grouped matmul kernel (needs 16-byte aligned strides)."""
    offsets = torch.tensor(list(counts), device=x_SI.device).cumsum(0).to(torch.int32)
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    y_SO = grouped_mm(x_SI.contiguous(), w if transposed else w.transpose(-2, -1), offs=offsets)
    return _ContiguousGrad.apply(y_SO) if y_SO.requires_grad else y_SO


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped matmul's backward refuses an expanded one
    (the gradient of a sum, say)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()
