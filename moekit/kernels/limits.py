"""How many rows a segment may have for moekit's kernels to take it; longer ones go to MKL, whose packing of the
weights pays for itself beyond. The crossovers depend on the CPU: moekit's kernels are AVX2, while MKL uses the
widest vectors the CPU has, so on AVX-512 CPUs it wins from far fewer rows. Measured with expert-shaped weights
(768-7168 x 1024-3584, 2 threads), kernel time / MKL time:

- AVX2 only: forward 0.6-0.95 up to 192 rows; input-major 0.4-0.8 at 2-16 rows, 0.9-1.2 at 28-32, 0.75-0.8 at 64;
  weight gradients 0.2-0.5 at 2-8 rows, 0.6-1.0 at 16-192.
- AVX-512: forward 0.47-0.9 up to 16 rows, 0.83-1.12 at 32, 1.23-1.42 at 64; input-major 0.6-0.9 up to 8 rows,
  1.0-1.2 at 16; weight gradients 0.5-0.86 at 4 rows, 0.65-1.13 at 8, 0.8-1.2 at 16.

The C++ side keeps its own upper bounds (kTiledRows, kInputMajorRows in csrc/kernels.h); these are at most those."""

from __future__ import annotations

from pathlib import Path


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


WIDE_VECTORS = "avx512f" in _cpu_flags()
# Linear layers' few-row products (a batch of decode steps) through segment_gemm: measured against F.linear on
# AVX-512 (2 threads, 1024-32000 x 1024-3072 weights), kernel time / torch time 0.16-0.64 at 8-16 rows, 0.36-0.95
# at 32-64, 0.5-1.07 at 96 (torch's few-row products read weights at 5-15 GB/s where the machine reads 40-50).
LINEAR_ROWS = 64
# One-row products (decode) through the gemv kernel from this many bytes of weights: measured against F.linear
# (2 threads, hot loop): 0.34x its time at 0.5 MiB, 0.34x at 1.5, 0.29x at 3; in a decode step, with the weights
# cold from streaming others, torch's one-row product of a 3 MiB weight read at 10 GB/s.
MIN_GEMV_BYTES = 64 * 2**10
TILED_ROWS = 24 if WIDE_VECTORS else 192  # forward products (csrc/segment_gemm.cpp, the fused block over tokens)
INPUT_MAJOR_ROWS = 12 if WIDE_VECTORS else 32  # input-major products and every expert's input gradient
GRAD_WEIGHT_ROWS = 8 if WIDE_VECTORS else 192  # weight gradients (csrc/grad_weight.cpp)
