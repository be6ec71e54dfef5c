"""moekit's C++ kernels for expert products where MKL leaves speed behind, and the Python face of each.

At decode a token's k experts each multiply one row (and so do the attention projections and the output head):
gemvs whose cost is reading the weights. On this class of CPU, MKL's gemv reaches 35-60% of the streaming
bandwidth on expert-sized matrices (short rows, small matrices, one thread pool hand-off per call), and its
few-row gemm about half; for segments of a few dozen rows it spends much of its time packing weights it uses for
only those rows; and a weight gradient of a few rows is all writes, which plain stores double. So moekit carries
small C++ kernels (csrc/: weight rows read in place, once for all the rows of their segment, AVX2/FMA; weight
gradients as outer products over packed panels, each element streamed out once) that reach 85-95% of the streaming
bandwidth and 1.1-6x MKL's speed on short segments. They are built once with torch's cpp_extension (needs a C++
compiler and ninja; cached under ~/.cache/moekit/kernels or $MOEKIT_KERNEL_DIR) the first time a product is large
enough to matter; where they cannot be built the callers fall back to torch's matmuls.
Both agree up to float rounding."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

# Below this many bytes of weights per call the product sits in cache and any kernel is fast: plain mv.
MIN_KERNEL_BYTES = 4 * 2**20

_lock = threading.Lock()
_kernel = {"module": None, "tried": False}


def load_kernel():
    """The compiled extension, building it on first use; None where it cannot be built (then never retried)."""
    with _lock:
        if not _kernel["tried"]:
            _kernel["tried"] = True
            if os.environ.get("MOEKIT_NO_KERNELS"):
                return None
            try:
                _kernel["module"] = _build()
            except Exception as e:  # no compiler or ninja: keep working, say so once
                warnings.warn(f"moekit: decode kernel unavailable ({type(e).__name__}); using torch.mv", stacklevel=3)
        return _kernel["module"]


def _build():
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if _has_avx2_fma() else [])
    csrc = Path(__file__).parent / "csrc"
    build_dir = _build_directory()
    with _build_lock(build_dir), _environment_ninja():
        return load(
            name="moekit_kernels",
            sources=[str(p) for p in sorted(csrc.glob("*.cpp"))],
            extra_include_paths=[str(csrc)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )


@contextlib.contextmanager
def _environment_ninja():
    """Build with the ninja installed beside this Python when there is one, activated or not: a system ninja of
    another version reads the other's logs as stale and rebuilds everything (a minute) whenever the two alternate,
    as between `moekit` run from an activated environment and `.venv/bin/moekit` run without."""
    here = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if not (Path(here) / "ninja").exists():
        yield
        return
    os.environ["PATH"] = here + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _build_directory() -> Path:
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    if os.environ.get("MOEKIT_KERNEL_DIR"):
        path = Path(os.environ["MOEKIT_KERNEL_DIR"]) / tag
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moekit" / "kernels" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an OS lock on the build directory while building. torch marks a build in progress with a plain `lock`
    file and waits forever for it to vanish, so a build killed half-way (Ctrl-C, a job time limit) would hang every
    later run. The OS lock dies with its process: whoever holds it knows any `lock` file left is stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own file lock only
        yield
        return
    with open(build_dir / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                warnings.warn(f"moekit: removing the lock an interrupted build left: {stale}", stacklevel=4)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def kernel_available() -> bool:
    return load_kernel() is not None


def segment_gemm(
    w_ENK: torch.Tensor, x_SK: torch.Tensor, segments: list[tuple[int, int, int]], y_SN: torch.Tensor
) -> bool:
    """Fill the rows of each (expert, start, count) segment of y_SN with those x rows times the expert's matrix;
    False (nothing written) when the kernel cannot take it: too little to stream (under MIN_KERNEL_BYTES of
    weights, where any kernel is fast), not fp32 contiguous CPU tensors, or no kernel here."""
    return _run_segments("segment_gemm", w_ENK, segments, w_ENK, x_SK, y_SN)


def segment_gemm_input_major(
    w_EKN: torch.Tensor, x_SK: torch.Tensor, segments: list[tuple[int, int, int]], y_SN: torch.Tensor
) -> bool:
    """The same as segment_gemm for input-major weights: y rows = x rows @ w_EKN[e] ([K, N] each), count <=
    INPUT_MAJOR_ROWS; False (nothing written) where the kernel cannot take it."""
    return _run_segments("segment_gemm_input_major", w_EKN, segments, w_EKN, x_SK, y_SN)


# Segments of at most this many rows go to moekit's tiled kernel (csrc/segment_gemm.cpp), longer ones to MKL: about
# where MKL's packing of the weights stops costing more than it saves (kernels.h's kTiledRows: the same bound in C++).
TILED_ROWS = 192
# Input-major segments up to this many rows go to moekit's kernel (each weight row read once, in place), longer
# ones to MKL: measured here, 1.5-2.4x MKL's speed at 2-16 rows, and since the kernel reads four streams 1.2-1.8x
# at 20, 0.9-1.2x at 28-32, 0.9-1.1x at 40 and 0.75-0.8x at 64 (Qwen3- and Mixtral-shaped input gradients).
INPUT_MAJOR_ROWS = 32


def segment_grad_weight(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, segments: list[tuple[int, int, int]], dw_ENK: torch.Tensor
) -> bool:
    """dw_ENK[e] = dy^T x over the rows of each (expert, start, count) segment, count <= GRAD_WEIGHT_ROWS (0: zeros),
    each dw row written once (streaming stores); False (nothing written) where the kernel cannot take it."""
    return _run_segments("segment_grad_weight", dw_ENK, segments, x_SK, dy_SN, dw_ENK)


# Weight-gradient segments up to this many rows go to moekit's kernel, longer ones to MKL (the C++ side checks the
# same kTiledRows). Measured here: 1.0-6x MKL's speed at 2-192 rows.
GRAD_WEIGHT_ROWS = TILED_ROWS


def _run_segments(
    name: str, w_ENK: torch.Tensor, segments: list[tuple[int, int, int]], *operands: torch.Tensor
) -> bool:
    """Run the kernel's `name`(operands[0], operands[1], experts, starts, counts, operands[2], threads) when it can
    take these tensors; w_ENK, the weight-shaped one of them, decides whether the product is large enough."""
    nbytes = len(segments) * w_ENK[0].numel() * w_ENK.element_size()
    kernel = kernel_for(nbytes, *operands) if segments else None
    if kernel is None or not all(t.is_contiguous() for t in operands):
        return False
    first, second, out = operands
    getattr(kernel, name)(first, second, *_segment_table(segments), out, torch.get_num_threads())
    return True


def _segment_table(segments: list[tuple[int, int, int]]) -> tuple[torch.Tensor, ...]:
    """Experts, starts and counts as three contiguous int64 tensors."""
    return tuple(torch.tensor(segments, dtype=torch.long).t().contiguous())


def gather_gemv(w_ENK: torch.Tensor, ids: list[int] | torch.Tensor, x_SK: torch.Tensor) -> torch.Tensor:
    """y_SN[r] = w_ENK[ids[r]] @ x_SK[r]: one-row segments; x_SK may be one row expanded (row stride 0) to all of
    them, as the k experts of one token share it. For inference: no autograd graph is recorded."""
    if x_SK.stride(-1) != 1:
        x_SK = x_SK.contiguous()
    y_SN = x_SK.new_empty(x_SK.shape[0], w_ENK.shape[1])
    kernel = kernel_for(_num_ids(ids) * w_ENK[0].numel() * w_ENK.element_size(), w_ENK, x_SK)
    if kernel is not None and w_ENK.is_contiguous():
        ids_S = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
        kernel.gather_gemv(w_ENK, x_SK, ids_S.contiguous(), y_SN, torch.get_num_threads())
        return y_SN
    for r, e in enumerate(ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        torch.mv(w_ENK[e].detach(), x_SK[r].detach(), out=y_SN[r])
    return y_SN


def linear_gemv(
    weights: list[torch.Tensor], x_K: torch.Tensor, biases: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """[F.linear(x_K, w, b) for w, b in zip(weights, biases)] in one pass over all the weights (the q, k and v
    projections of one decode step share their input row). For inference: no autograd graph is recorded."""
    biases = biases if biases is not None else [None] * len(weights)
    x_K = x_K.contiguous()
    kernel = kernel_for(sum(w.numel() for w in weights) * x_K.element_size(), *weights, x_K)
    if kernel is None or not all(w.is_contiguous() for w in weights):  # small, not fp32 (autocast too), no kernel
        return [F.linear(x_K, w, b) for w, b in zip(weights, biases, strict=True)]
    ys = [x_K.new_empty(w.shape[0]) for w in weights]
    kernel.linear_gemv(weights, x_K, ys, torch.get_num_threads())
    return [y if b is None else y + b for y, b in zip(ys, biases, strict=True)]


def _num_ids(ids: list[int] | torch.Tensor) -> int:
    return ids.numel() if isinstance(ids, torch.Tensor) else len(ids)


def kernel_for(nbytes: int, *tensors: torch.Tensor):
    """The kernel when it can take these fp32 CPU tensors and they are large enough to stream; else None."""
    return kernel_taking(*tensors) if nbytes >= MIN_KERNEL_BYTES else None


def kernel_taking(*tensors: torch.Tensor):
    """The kernel when it is built and these tensors are fp32 on the CPU (of any size); else None."""
    if any(t.dtype != torch.float32 or not t.is_cpu for t in tensors):
        return None
    return load_kernel()
