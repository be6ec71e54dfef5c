"""What every module holding quantized weights shares: the parts of each weight as buffers named as the checkpoint
names them (so the state dict is the checkpoint's), their dequantization, and casts that leave them alone (model.
float() must not turn FP8 bytes into fp32 numbers: only the module's float parameters follow a dtype change)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.kernels.quantized import dequantize
from moekit.quant.formats import Format, Parts

STORE_ROWS = 4096  # rows quantized at a time by store(): a multiple of every format's row block (FP8's 128)


class QuantizedModule(nn.Module):
    """Subclasses call hold() for each quantized weight. int8_activations: whether products may round their input
    rows to int8 per group of 32 where a kernel then reads the weights' bytes (decode); False: every product
    dequantizes and multiplies in the activations' own precision (slower, for comparing with float models)."""

    fmt: Format
    int8_activations = True

    def hold(self, base: str, shape: tuple[int, ...], pieces: int = 1, device=None) -> None:
        """Buffers for the parts of weight `base` of `shape` (uninitialised: a checkpoint or quantize fills them)."""
        self._held = {**getattr(self, "_held", {}), base: (tuple(shape), pieces)}
        for suffix, (part_shape, dtype) in self.fmt.parts(shape, pieces).items():
            self.register_buffer(base + suffix, torch.empty(part_shape, dtype=dtype, device=device))

    def held_weights(self) -> list[str]:
        return list(self._held)

    def held(self, base: str) -> tuple[tuple[int, ...], int]:
        """(shape, pieces) of weight `base`."""
        return self._held[base]

    def piece_shape(self, base: str, piece: bool = False) -> tuple[int, ...]:
        """The shape of weight `base`; piece: of one expert's piece of it (gate or up alone where two pieces)."""
        shape, pieces = self._held[base]
        return (shape[-2] // pieces, shape[-1]) if piece else shape

    def parts(self, base: str, index: torch.Tensor | None = None) -> Parts:
        """The parts of weight `base`; with index, those of the chosen rows of its leading (expert) axis."""
        names = self.fmt.parts(*self._held[base])
        return {s: getattr(self, base + s) if index is None else getattr(self, base + s)[index] for s in names}

    def dequantized(self, base: str, dtype: torch.dtype, index: torch.Tensor | None = None) -> torch.Tensor:
        fast = dequantize(self, base, index)
        if fast is not None:
            return fast.to(dtype)
        shape, pieces = self._held[base]
        if index is not None:
            shape = (index.numel(), *shape[1:])
        return self.fmt.dequantize(self.parts(base, index), shape, pieces, name=base).to(dtype)

    def store(self, base: str, w: torch.Tensor) -> None:
        """Quantize the float weight w (any float dtype) into the parts of `base`, a slice at a time (see
        store_rows), so that the float copies quantizing makes stay small beside the weight."""
        shape, _ = self._held[base]
        if tuple(w.shape) != shape:
            raise ValueError(f"{base}: weight shape {list(w.shape)} does not fit the held {list(shape)}")
        step = self.store_step(base)
        for start in range(0, shape[0], step):
            self.store_rows(base, start, w[start : start + step])

    def store_step(self, base: str) -> int:
        """How many leading rows store_rows takes at a time: one expert of a stack, STORE_ROWS rows of a matrix."""
        shape, _ = self._held[base]
        return 1 if len(shape) == 3 else min(shape[0], STORE_ROWS)

    def store_rows(self, base: str, start: int, w: torch.Tensor) -> None:
        """Quantize w, the rows start:start + len(w) of weight `base`'s leading axis (experts of a stack, rows of a
        matrix; start a multiple of store_step), into those rows of its parts."""
        shape, pieces = self._held[base]
        if tuple(w.shape[1:]) != shape[1:] or start + w.shape[0] > shape[0]:
            raise ValueError(f"{base}: rows {start}+{list(w.shape)} do not fit the held {list(shape)}")
        with torch.no_grad():
            if len(shape) == 3:
                for i in range(w.shape[0]):
                    for suffix, part in self.fmt.quantize(w[i].float(), pieces).items():
                        getattr(self, base + suffix)[start + i].copy_(part)
                return
            step = self.store_step(base)
            whole, chunk = self.fmt.parts(shape), self.fmt.parts((step, *shape[1:]))
            for suffix, part in self.fmt.quantize(w.float()).items():
                # the part's row axis: the one where a step's shape and the whole's differ
                sides = zip(chunk[suffix][0], whole[suffix][0], strict=True)
                axis = next((a for a, (c, f) in enumerate(sides) if c != f), 0)
                at = start * chunk[suffix][0][axis] // step
                getattr(self, base + suffix).narrow(axis, at, part.shape[axis]).copy_(part)

    def check_parts(self, name_of) -> None:
        """The format's checks of every held weight; name_of(base) names it in errors (file and tensor)."""
        for base in self._held:
            self.fmt.check(self.parts(base), name_of(base))

    def kernel_cache(self) -> dict:
        """A per-module cache for what kernels build from the parts (moekit.kernels.quantized); cleared when the
        buffers move, never copied with the module."""
        cache = self.__dict__.get("_kernel_cache")
        if cache is None:
            cache = self.__dict__["_kernel_cache"] = _KernelCache()
        return cache

    def held_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_kernel_cache", None)  # built on the old buffers
        parts = {n: b for n, b in self._buffers.items() if b is not None}
        out = super()._apply(fn, recurse)
        for n, before in parts.items():
            after = self._buffers[n]
            if after.dtype != before.dtype:  # a dtype change: the bytes keep theirs (only a device move applies)
                self._buffers[n] = before.to(after.device)
        return out


class _KernelCache(dict):
    """Holds kernel objects (not copyable): a copy of the module starts with an empty cache."""

    def __deepcopy__(self, memo):
        return _KernelCache()

    def __reduce__(self):
        return (_KernelCache, ())


def set_int8_activations(model: nn.Module, enabled: bool) -> None:
    """Whether the quantized modules of model may round their input rows to int8 (see QuantizedModule)."""
    for m in model.modules():
        if isinstance(m, QuantizedModule):
            m.int8_activations = enabled


def is_quantized(module: nn.Module) -> bool:
    """Whether module or any module inside it holds quantized weights."""
    return any(isinstance(m, QuantizedModule) for m in module.modules())
