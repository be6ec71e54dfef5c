"""Peak resident memory of loading a checkpoint, measured in a fresh process (Linux /proc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def loading_growth(directory: Path, warm: Path | None = None) -> int:
    """Bytes the peak resident size (VmHWM) grows by while moekit.from_pretrained(directory) runs; warm: a checkpoint
    loaded first, so that imports and first-use costs are paid before the measurement."""
    code = (  # writing 5 to clear_refs resets the peak to the current resident size
        "import re, torch, moekit\n"
        "kb = lambda key: int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read())[1]) * 1024\n"
        + (f"moekit.from_pretrained({str(warm)!r})\n" if warm else "")
        + "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        f"model = moekit.from_pretrained({str(directory)!r})\n"
        "print(kb('VmHWM') - before)\n"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
