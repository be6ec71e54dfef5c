"""The KV cache of a generation: per layer, what attention needs of every earlier token (keys and values for
GQA; the normalised latent and the rotated shared key for MLA, which is why MLA's cache is small); for recurrent
layers (linear attention), a fixed-size state per sequence instead."""

from __future__ import annotations

import torch


class KVCache:
    """Each cached tensor lives in a buffer with room to spare along its sequence axis: a step writes only its new
    tokens (amortised O(1), where concatenating would copy the whole cache at every token) and reads a view."""

    def __init__(self) -> None:
        self.length = 0  # tokens already cached (the same in every layer)
        self._buffers: dict[int, list[torch.Tensor]] = {}
        self._dims: dict[int, tuple[int, ...]] = {}  # each cached tensor's sequence axis
        self._states: dict[int, tuple[torch.Tensor, ...]] = {}  # recurrent layers: their state after `length`

    def state(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        """A recurrent layer's state after the cached tokens (linear attention: conv and recurrent state), or None."""
        return self._states.get(layer)

    def set_state(self, layer: int, *state: torch.Tensor) -> None:
        self._states[layer] = state

    def extend(self, layer: int, dims: tuple[int, ...], *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new tokens' tensors (sequence axis dims[i] of each) after the first `length` cached ones and
        return views of the whole cached tensors."""
        start = self.length
        if layer not in self._buffers:
            if start:
                raise ValueError(f"layer {layer} has no cache, but {start} tokens are cached: allowed a fresh cache")
            empty = [t.narrow(d, 0, 0) for t, d in zip(new, dims, strict=True)]
            self._buffers[layer] = [_with_room(t, d, t.shape[d]) for t, d in zip(empty, dims, strict=True)]
            self._dims[layer] = dims
        out = []
        for i, (t, d) in enumerate(zip(new, dims, strict=True)):
            buf = self._grow(layer, i, start + t.shape[d])
            buf.narrow(d, start, t.shape[d]).copy_(t)
            out.append(buf.narrow(d, 0, start + t.shape[d]))
        return tuple(out)

    def room(self, layer: int, count: int) -> list[torch.Tensor]:
        """The whole buffers of a layer that has cached tokens, grown to hold `count` more after them: for a kernel
        that writes the new tokens itself (at index `length` of each buffer's sequence axis)."""
        if layer not in self._buffers:
            raise ValueError(f"layer {layer} has no cache: allowed a layer that cached earlier tokens")
        return [self._grow(layer, i, self.length + count) for i in range(len(self._buffers[layer]))]

    def has(self, layer: int) -> bool:
        return layer in self._buffers

    def _grow(self, layer: int, i: int, needed: int) -> torch.Tensor:
        buf, d = self._buffers[layer][i], self._dims[layer][i]
        if needed > buf.shape[d]:
            buf = self._buffers[layer][i] = _with_room(buf.narrow(d, 0, self.length), d, needed)
        return buf

    ragged = False  # every row holds the same tokens' positions (see SlotView for rows that do not)

    def advance(self, t: int) -> None:
        """Count t more tokens as cached (after every layer wrote them)."""
        self.length += t

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on (rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length={length} is invalid: allowed [0, {self.length}]")
        if self._states and length != self.length:
            raise ValueError("a cache of recurrent layers (linear attention) cannot forget tokens: allowed none")
        self.length = length

    def nbytes(self) -> int:
        """Bytes of the cached tokens (not of the spare room)."""
        total = 0
        for layer, buffers in self._buffers.items():
            for buf, d in zip(buffers, self._dims[layer], strict=True):
                total += buf.numel() // buf.shape[d] * self.length * buf.element_size()
        return total + sum(t.numel() * t.element_size() for state in self._states.values() for t in state)


def _with_room(t: torch.Tensor, dim: int, needed: int) -> torch.Tensor:
    """A buffer holding t at its start, with room for `needed` tokens and as many again (at least 64)."""
    shape = list(t.shape)
    shape[dim] = max(2 * needed, 64)
    buf = t.new_empty(shape)
    buf.narrow(dim, 0, t.shape[dim]).copy_(t)
    return buf
