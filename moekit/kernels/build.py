"""Building and loading moekit's C++ kernels (csrc/): compiled once with torch's cpp_extension (needs a C++ compiler
and ninja), cached under ~/.cache/moekit/kernels or $MOEKIT_KERNEL_DIR; where they cannot be built every caller
falls back to torch's ops and moekit says so once. MOEKIT_NO_KERNELS=1 turns them off."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from moekit.kernels.limits import INPUT_MAJOR_ROWS, TILED_ROWS

# Below this many bytes of weights per call the product sits in cache and any kernel is fast: plain torch ops.
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
                module = _build()
                module.set_row_limits(TILED_ROWS, INPUT_MAJOR_ROWS)
                _kernel["module"] = module
            except Exception as e:  # no compiler or ninja: keep working, say so once
                warnings.warn(f"moekit: C++ kernels unavailable ({type(e).__name__}); using torch's ops", stacklevel=3)
        return _kernel["module"]


def _build():
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if _has_avx2_fma() else [])
    csrc = Path(__file__).parent / "csrc"
    build_dir = _build_directory()
    with _build_lock(build_dir), _environment_ninja():
        start = time.perf_counter()
        stale = _stale(build_dir / "moekit_kernels.so", csrc)
        if stale:  # a minute of silence on a fresh machine would look like a hang
            print(
                f"moekit: building its C++ kernels, once (about a minute on 2 cores; kept in {build_dir})",
                file=sys.stderr,
                flush=True,
            )
        module = load(
            name="moekit_kernels",
            sources=[str(p) for p in sorted(csrc.glob("*.cpp"))],
            extra_include_paths=[str(csrc)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
        if stale:
            print(f"moekit: kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return module


def _stale(library: Path, csrc: Path) -> bool:
    """Whether the built library is missing or older than a source (then the build below compiles)."""
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(p.stat().st_mtime > built for p in (*csrc.glob("*.cpp"), *csrc.glob("*.h")))


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
    # one directory per installed copy too: two checkouts sharing one would each rebuild the other's kernels, silently
    # (torch's loader rebuilds when the sources' paths change), on every alternation
    where = hashlib.sha1(str(Path(__file__).resolve().parent).encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{where}".replace("+", "_")
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
    return " avx2" in flags and " fma" in flags and " f16c" in flags  # every AVX2 CPU has F16C


def kernel_available() -> bool:
    return load_kernel() is not None


def kernel_for(nbytes: int, *tensors: torch.Tensor):
    """The kernel when it can take these fp32 CPU tensors and they are large enough to stream; else None."""
    return kernel_taking(*tensors) if nbytes >= MIN_KERNEL_BYTES else None


def kernel_taking(*tensors: torch.Tensor):
    """The kernel when it is built and these tensors are fp32 on the CPU (of any size); else None."""
    if any(t.dtype != torch.float32 or not t.is_cpu for t in tensors):
        return None
    return load_kernel()
