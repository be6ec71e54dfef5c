"""Finding and reading the safetensors files of a Hugging Face model directory, with one-line errors naming the
file: no config, pickled checkpoints (refused, never unpickled), missing shards, corrupt or truncated files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


def checkpoint_dir(path: str | Path) -> Path:
    """The model directory at path; a moekit training run directory stands for its final model (RUN/final)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected a Hugging Face model directory with config.json)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return path


def weight_map(path: Path) -> dict[str, Path]:
    """{tensor name: file} from the shard index, or every tensor of model.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            entries = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid shard index ({e})") from None
        files = {name: path / file for name, file in entries.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ValueError(f"{file}: shard listed in {INDEX} is missing")
        return files
    single = path / SINGLE
    if single.is_file():
        return dict.fromkeys(SafetensorsFile(single).keys(), single)
    pickled = [name for name in PICKLED if (path / name).exists()] + [p.name for p in path.glob("*.bin")][:1]
    if pickled:
        raise ValueError(
            f"{path / pickled[0]}: pickled checkpoints are refused (unpickling runs arbitrary code); convert it once "
            "in a trusted environment: transformers' from_pretrained(...).save_pretrained(dir) writes safetensors"
        )
    raise ValueError(f"{path}: no {SINGLE} or {INDEX}")


DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20
CONVERT_BYTES = 64 * 2**20  # a tensor read into another dtype goes through a buffer of at most this size


class SafetensorsFile:
    """One safetensors file read tensor by tensor with plain reads straight into the destination's memory (no
    mapping, no intermediate copy when dtypes agree), so loading costs the model's own size and nothing more.
    The header is checked against the file's size: a corrupt or truncated file fails here, naming the file."""

    def __init__(self, file: Path):
        self.file = file
        try:
            size = file.stat().st_size
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
                if not 2 <= n <= min(MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{file}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start, data_size = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
                count = math.prod(shape)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{file}: corrupt safetensors header entry for {name!r}") from None
            if end - begin != count * dtype.itemsize or not 0 <= begin <= end:
                raise ValueError(f"{file}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
            if end > data_size:
                raise ValueError(f"{file}: truncated: tensor {name!r} ends at byte {end} of {data_size}")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Fill dst (any dtype, same shape) with the tensor; a conversion goes through a bounded buffer."""
        dtype, shape, begin, end = self.entries[name]
        if dst.dtype == dtype and dst.is_contiguous():
            self._read_bytes(name, begin, end, dst.view(-1))
            return
        if not dst.is_contiguous():  # a view of a larger tensor (never 0-d): read whole, then copy
            dst.copy_(self.read_rows(name, 0, shape[0]))
            return
        flat = dst.view(-1)
        step = max(1, CONVERT_BYTES // dtype.itemsize)
        buffer = torch.empty(min(step, flat.numel()), dtype=dtype)
        for start in range(0, flat.numel(), step):
            n = min(step, flat.numel() - start)
            offset = begin + start * dtype.itemsize
            self._read_bytes(name, offset, offset + n * dtype.itemsize, buffer[:n])
            flat[start : start + n].copy_(buffer[:n])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the tensor's leading axis, in the file's dtype (one read of their bytes)."""
        dtype, shape, begin, _ = self.entries[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        self._read_bytes(name, begin + start * row, begin + stop * row, out.view(-1))
        return out

    def _read_bytes(self, name: str, begin: int, end: int, flat: torch.Tensor) -> None:
        with open(self.file, "rb") as fh:
            fh.seek(self.data_start + begin)
            if fh.readinto(memoryview(flat.view(torch.uint8).numpy())) != end - begin:
                raise ValueError(f"{self.file}: truncated while reading {name!r}")


class Shards:
    """The files of a checkpoint: shape, dtype and read_into by tensor name. stored: {name: the name in the file}
    where the two differ (a multimodal wrapper's language model read under the text model's names)."""

    def __init__(self, files: dict[str, Path], stored: dict[str, str] | None = None):
        self.files = files
        self._stored = stored or {}
        self._handles = {file: SafetensorsFile(file) for file in sorted(set(files.values()))}
        for name, file in files.items():
            if self._entry(name) not in self._handles[file].entries:
                raise ValueError(f"{file}: lacks tensor {self._entry(name)!r} that {INDEX} places there")

    def _entry(self, name: str) -> str:
        return self._stored.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handles[self.files[name]].entries[self._entry(name)][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._handles[self.files[name]].entries[self._entry(name)][0]

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        self._handles[self.files[name]].read_into(self._entry(name), dst)

    def location(self, name: str) -> tuple[Path, int, int, torch.dtype, tuple[int, ...]]:
        """(file, byte offset in it, bytes, dtype, shape) of a tensor: where a reader of its bytes finds them."""
        handle = self._handles[self.files[name]]
        dtype, shape, begin, end = handle.entries[self._entry(name)]
        return handle.file, handle.data_start + begin, end - begin, dtype, shape

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._handles[self.files[name]].read_rows(self._entry(name), start, stop)

    def read(self, name: str) -> torch.Tensor:
        t = torch.empty(self.shape(name), dtype=self.dtype(name))
        self.read_into(name, t)
        return t


def fsync_path(path: Path) -> None:
    """Flush a file or a directory (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, write) -> None:
    """write(tmp) to a temporary name beside target, fsync it, rename it over target, fsync the directory: a crash
    leaves the old file or the new one, never a mix."""
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)
