"""Text corpora. The default is the Python standard library's own source: real text on every machine, no download."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

from moekit.train.tokenizer import ByteTokenizer


def stdlib_files() -> list[Path]:
    """The standard library's .py files (not site-packages), sorted for reproducibility."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    if not files:
        raise ValueError(f"no Python source files under {root}: pass a text file or directory instead")
    return files


def is_validation(path: Path, every: int = 20) -> bool:
    """A fixed 1-in-`every` file split, stable across machines (CRC of the relative name)."""
    return zlib.crc32(path.name.encode()) % every == 0


def read_texts(files: list[Path], max_bytes: int) -> str:
    """Concatenated file contents (undecodable bytes replaced), at most max_bytes."""
    parts, size = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "".join(parts)[:max_bytes]


def token_batches(text: str, batch_size: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping [batch, seq_len] windows of byte tokens from the start of text."""
    ids = torch.tensor(ByteTokenizer().encode(text), dtype=torch.long)
    need = batch_size * seq_len
    if ids.numel() < need:
        raise ValueError(f"corpus holds {ids.numel()} tokens: allowed at least batch_size*seq_len={need}")
    return ids[:need].view(batch_size, seq_len)
