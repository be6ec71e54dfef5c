"""Process settings moekit asks of the C allocator before anything large is allocated.

Large CPU buffers are written fresh at every step (a stacked expert weight gradient of hundreds of MB, the row
gathers and expert activations of a prefill, several MB each). glibc's malloc hands anything above its mmap
threshold (at most 32 MB, adjusted as it goes) straight to the kernel and gives it back on free, so every step
faults the same memory in again, 4 KB at a time (a 300 MB zeroed gradient costs ten times its writing). Raising the
mmap and trim thresholds keeps freed buffers in malloc's heap for the next step. The cost: memory freed by the
process stays mapped to it for reuse instead of going back to the system. Set MOEKIT_MALLOC=default before importing
moekit to leave malloc as it was."""

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 2**30  # allocations above 1 GB (whole checkpoints, say) still go straight to the kernel


def _keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve and keep buffers up to 1 GB in its heap; False where that is not glibc."""
    if not sys.platform.startswith("linux") or os.environ.get("MOEKIT_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False


_keep_freed_memory()
