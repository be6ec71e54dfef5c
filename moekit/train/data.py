"""Text corpora and batches. The default corpus is the Python standard library's own source: real text on every
machine, no download. A fixed 1-in-20 split of the files (by name) is held out for validation."""

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
    """A fixed 1-in-`every` file split, stable across machines (CRC of the file name)."""
    return zlib.crc32(path.name.encode()) % every == 0


def _readable(path: Path) -> str | None:
    """A file's text, or None for binary or unreadable files (a NUL byte in the first 8 KB marks binary)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\0" in raw[:8192]:
        return None
    return raw.decode("utf-8", errors="replace")


def read_texts(files: list[Path], max_bytes: int) -> str:
    """Concatenated text of the readable files, at most max_bytes."""
    parts, size = [], 0
    for f in files:
        text = _readable(f)
        if not text:
            continue
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "".join(parts)[:max_bytes]


def load_corpus(data: str, max_train: int, max_val: int) -> tuple[str, str, str]:
    """(train text, validation text, description). data: '' (the standard library), a directory (its files, split
    1-in-20 by name) or one text file (its last 5% held out)."""
    if not data:
        files, what = stdlib_files(), "the Python standard library"
    else:
        path = Path(data)
        if not path.exists():
            raise ValueError(f"data path {path} does not exist")
        if path.is_file():
            text = read_texts([path], max_train + max_val)
            if not text.strip():
                raise ValueError(f"data path {path} holds no readable text")
            cut = max(1, int(len(text) * 0.95))
            return text[:cut], text[cut:], str(path)
        files, what = sorted(p for p in path.rglob("*") if p.is_file()), str(path)
    train = read_texts([f for f in files if not is_validation(f)], max_train)
    val = read_texts([f for f in files if is_validation(f)], max_val)
    if not train.strip():
        raise ValueError(f"data path {data} holds no readable text")
    if not val.strip():  # too few files for the name split: hold out the tail instead
        cut = max(1, int(len(train) * 0.95))
        train, val = train[:cut], train[cut:]
    return train, val, what


def token_batches(text: str, batch_size: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping [batch, seq_len] windows of byte tokens from the start of text."""
    ids = torch.tensor(ByteTokenizer().encode(text), dtype=torch.long)
    need = batch_size * seq_len
    if ids.numel() < need:
        raise ValueError(f"corpus holds {ids.numel()} tokens: allowed at least batch_size*seq_len={need}")
    return ids[:need].view(batch_size, seq_len)


class TokenStream:
    """One long token sequence; batch(seed, step, micro) draws the same random windows for the same arguments on
    every machine and after every restart, so a resumed run sees exactly the batches of an uninterrupted one."""

    def __init__(self, ids_N: torch.Tensor, seq_len: int, what: str):
        if ids_N.numel() < seq_len + 1:
            raise ValueError(f"{what} holds {ids_N.numel()} tokens: allowed at least seq_len + 1 = {seq_len + 1}")
        self.ids_N, self.seq_len = ids_N, seq_len

    def batch(self, batch_size: int, seed: int, step: int, micro: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)
        starts_B = torch.randint(0, self.ids_N.numel() - self.seq_len + 1, (batch_size,), generator=g)
        return torch.stack([self.ids_N[s : s + self.seq_len] for s in starts_B.tolist()])

    def windows(self, batch_size: int, count: int) -> list[torch.Tensor]:
        """Up to `count` fixed, evenly spaced [batch, seq_len] batches (validation)."""
        n = self.ids_N.numel() - self.seq_len + 1
        total = min(batch_size * count, max(1, n))
        starts = torch.linspace(0, n - 1, total).long().tolist()
        rows = torch.stack([self.ids_N[s : s + self.seq_len] for s in starts])
        return list(rows.split(batch_size))
