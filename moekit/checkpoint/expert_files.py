"""Routed experts read one at a time from a model's own safetensors files: where each expert's bytes lie (from the
family's key map: per-expert tensors or rows of stacked ones) and a reader that fetches them with `pread`, with
O_DIRECT where the file system allows it (the page cache neither hides the reads from a benchmark nor holds a
second copy of what the expert cache already holds), else with plain reads whose pages are dropped afterwards.

Nothing is ever written to the checkpoint. Each read checks the file against the size and modification time it had
when it was opened (a file that changes or shrinks under a running model is an error, not a wrong token), that all
bytes arrived, and, from the second read of an expert on, their CRC-32 against the first read's."""

from __future__ import annotations

import os
import re
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.checkpoint.files import Shards
from moekit.checkpoint.keymap import KeyMap

ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and buffers (covers every common block size)
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.((?:gate_up_proj|down_proj)(?:_[a-z_]+)?)$")


class ExpertReadError(RuntimeError):
    """An expert's bytes could not be read as they were: the file changed, shrank or failed to read."""


@dataclass(frozen=True)
class Piece:
    """One tensor (or one row of a stacked tensor) of one expert in a file: bytes [offset, offset + nbytes) hold a
    `shape` tensor of `dtype` that goes to `part` of the expert's slot ('gate' / 'up': the two halves of gate_up_proj,
    'whole': all of it). name: the checkpoint tensor, for messages."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    part: str
    view: str
    name: str


def expert_pieces(shards: Shards, keymap: KeyMap, parts: dict, layers: dict[int, int]) -> dict:
    """{(layer, expert): [Piece]} of every routed expert of the given MoE layers ({moekit layer index: experts};
    multi-token-prediction layers are not among them). parts: {part: (shape of one expert's part, dtype)}, as
    ExpertsOnDisk.part_specs names them. Errors name what is missing, misshapen or stored otherwise; experts fused
    with other tensors (DBRX) are refused."""
    if any("experts" in rule.checkpoint for rule in keymap.fused):
        raise ValueError("expert offloading: this family stores its experts fused into other tensors (not supported)")
    pieces: dict[tuple[int, int], list[Piece]] = {}
    per_expert = keymap.experts.pattern() if keymap.experts.per_expert else None
    projection = {keymap.experts.gate: "gate", keymap.experts.up: "up", keymap.experts.down: "down"}
    for name in shards.files:
        m = per_expert.match(name) if per_expert else None
        if m:  # one expert's gate, up or down (or a quantized part of it): all of the tensor
            layer = _STACKED.match(keymap.to_moekit(f"{m[1]}.mlp.experts.gate_up_proj") or "")
            if layer is None or int(layer[1]) not in layers:
                continue
            which = projection[m[3]]
            base, view = ("down_proj", "whole") if which == "down" else ("gate_up_proj", which)
            part = base + m[4]
            key = (int(layer[1]), int(m[2]))
            pieces.setdefault(key, []).append(_piece(shards, name, None, part, view, parts))
            continue
        m = _STACKED.match(keymap.to_moekit(name) or "")
        if m and int(m[1]) in layers:  # all experts' part stacked: expert e is row e
            for e in range(shards.shape(name)[0]):
                pieces.setdefault((int(m[1]), e), []).append(_piece(shards, name, e, m[2], "whole", parts))
    split = ("gate", "up") if per_expert else ("whole",)
    need = {(p, v) for p in parts for v in (split if p.startswith("gate_up_proj") and "bias" not in p else ("whole",))}
    where = next(iter(shards.files.values())).parent if shards.files else "checkpoint"
    for key in sorted({(i, e) for i, n in layers.items() for e in range(n)} | set(pieces)):
        have = [(p.part, p.view) for p in pieces.get(key, [])]
        if key[1] >= layers[key[0]]:
            raise ValueError(f"{where}: names expert {key[1]} of layer {key[0]}, the config has {layers[key[0]]}")
        if set(have) != need or len(have) != len(need):
            lost = ", ".join(sorted(f"{p} {v}" for p, v in need - set(have))) or "one part twice"
            raise ValueError(f"{where}: expert {key[1]} of layer {key[0]}: {lost} (expert offloading)")
    return pieces


def _piece(shards: Shards, name: str, row: int | None, part: str, view: str, parts: dict) -> Piece:
    file, offset, nbytes, dtype, stored = shards.location(name)
    if part not in parts:
        raise ValueError(f"{file}: tensor {name!r} is no part of these experts ({', '.join(parts)})")
    shape, held = parts[part]
    if view != "whole":  # gate or up: one half of the part's rows
        shape = (shape[0] // 2, *shape[1:])
    if row is not None:  # one row of a stacked tensor
        nbytes //= stored[0]
        offset, stored = offset + row * nbytes, stored[1:]
    if tuple(stored) != tuple(shape):
        implied = list(shape)
        raise ValueError(f"{file}: tensor {name!r} holds experts of shape {list(stored)}, the config implies {implied}")
    floats = all(t.is_floating_point and t.itemsize > 1 for t in (dtype, held))  # quantized bytes never convert
    if dtype != held and not floats:
        raise ValueError(f"{file}: tensor {name!r} is {dtype}, the model holds it as {held}")
    return Piece(file, offset, nbytes, dtype, tuple(shape), part, view, name)


@dataclass(frozen=True)
class _Run:
    """Bytes [offset, offset + nbytes) of one file holding one or more of an expert's pieces back to back."""

    file: Path
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


def _runs(pieces: list[Piece]) -> list[_Run]:
    """An expert's pieces as few reads as possible: pieces adjacent in one file read together (a per-expert
    checkpoint's gate, up and down usually lie side by side)."""
    runs: list[_Run] = []
    for p in sorted(pieces, key=lambda p: (str(p.file), p.offset)):
        last = runs[-1] if runs else None
        if last is not None and last.file == p.file and last.offset + last.nbytes == p.offset:
            runs[-1] = _Run(p.file, last.offset, last.nbytes + p.nbytes, (*last.pieces, p))
        else:
            runs.append(_Run(p.file, p.offset, p.nbytes, (p,)))
    return runs


class ExpertReader:
    """Reads whole experts into slot tensors; safe to call from several threads at once (each has its own aligned
    buffer; the reads release the GIL). direct: O_DIRECT wanted (it is used file by file where the file system
    takes it: `direct_files` says where)."""

    def __init__(self, pieces: dict[tuple[int, int], list[Piece]], direct: bool = True, verify: bool = True):
        self.runs = {key: _runs(p) for key, p in pieces.items()}
        self.verify = verify
        self._local = threading.local()
        self._fds: dict[Path, int] = {}
        self._stat: dict[Path, tuple[int, int]] = {}
        self.direct_files: set[Path] = set()
        for file in sorted({r.file for runs in self.runs.values() for r in runs}):
            self._open(file, direct)
        self._crc: dict[tuple[tuple[int, int], int], int] = {}

    def _open(self, file: Path, direct: bool) -> None:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(file, flags | os.O_DIRECT)
                os.preadv(fd, [memoryview(self._buffer(ALIGN).numpy())], 0)  # some file systems fail only on read
                self.direct_files.add(file)
            except OSError:
                if fd >= 0:
                    os.close(fd)
                fd = -1
        if fd < 0:
            try:
                fd = os.open(file, flags)
            except OSError as e:
                raise ExpertReadError(f"{file}: cannot open for expert reads ({e.strerror})") from None
        st = os.fstat(fd)
        self._fds[file], self._stat[file] = fd, (st.st_size, st.st_mtime_ns)

    def expert_bytes(self, key: tuple[int, int]) -> int:
        return sum(r.nbytes for r in self.runs[key])

    def read(self, key: tuple[int, int], slot: dict[str, torch.Tensor]) -> tuple[int, float]:
        """Read expert `key` = (layer, expert) into slot {part: tensor of one expert's part}; (bytes read from disk,
        seconds). Raises ExpertReadError naming the file and expert when the bytes are not what they were."""
        start = time.perf_counter()
        total = 0
        for i, run in enumerate(self.runs[key]):
            data = self._read_run(key, run)
            total += data.numel()
            if self.verify:
                crc = zlib.crc32(memoryview(data.numpy()))
                first = self._crc.setdefault((key, i), crc)
                if crc != first:
                    raise ExpertReadError(
                        f"{run.file}: expert {key[1]} of layer {key[0]} ({run.pieces[0].name}) reads differently than "
                        "it did first (checksum): the file changed under the running model"
                    )
            at = 0
            for p in run.pieces:
                src = data[at : at + p.nbytes].view(p.dtype).view(p.shape)
                dst = slot[p.part]
                if p.view != "whole":
                    half = dst.shape[0] // 2
                    dst = dst[:half] if p.view == "gate" else dst[half:]
                dst.copy_(src)
                at += p.nbytes
        return total, time.perf_counter() - start

    def _read_run(self, key: tuple[int, int], run: _Run) -> torch.Tensor:
        """The run's bytes (a view into this thread's buffer, valid until its next read)."""
        fd = self._fds[run.file]
        direct = run.file in self.direct_files
        begin = run.offset - run.offset % ALIGN if direct else run.offset
        end = -(-(run.offset + run.nbytes) // ALIGN) * ALIGN if direct else run.offset + run.nbytes
        buf = self._buffer(end - begin)
        view = memoryview(buf.numpy())
        got = 0
        try:
            while got < run.offset + run.nbytes - begin:
                n = os.preadv(fd, [view[got:]], begin + got)
                if n == 0:
                    break
                got += n
            if not direct and hasattr(os, "posix_fadvise"):  # keep no second copy in the page cache
                os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)
            st = os.fstat(fd)
        except OSError as e:
            raise ExpertReadError(
                f"{run.file}: reading expert {key[1]} of layer {key[0]} failed ({e.strerror})"
            ) from None
        if (st.st_size, st.st_mtime_ns) != self._stat[run.file]:
            raise ExpertReadError(
                f"{run.file}: changed under the running model (size {self._stat[run.file][0]} -> {st.st_size} bytes "
                "or modified): reload the model"
            )
        if got < run.offset + run.nbytes - begin:
            raise ExpertReadError(f"{run.file}: truncated while reading expert {key[1]} of layer {key[0]}")
        skip = run.offset - begin
        return buf[skip : skip + run.nbytes]

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """This thread's ALIGN-aligned byte buffer of at least nbytes (grown as needed, reused)."""
        held = getattr(self._local, "buffer", None)
        if held is None or held.numel() < nbytes:
            raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
            pad = -raw.data_ptr() % ALIGN
            held = self._local.buffer = raw[pad : pad + nbytes]
        return held[:nbytes]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        if hasattr(self, "_fds"):
            self.close()
