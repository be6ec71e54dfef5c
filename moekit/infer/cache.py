"""The KV cache of a generation: per layer, what attention needs of every earlier token (keys and values for
GQA; the normalised latent and the rotated shared key for MLA, which is why MLA's cache is small)."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self) -> None:
        self.length = 0  # tokens already cached (the same in every layer)
        self._layers: dict[int, list[torch.Tensor]] = {}
        self._dims: dict[int, tuple[int, ...]] = {}  # each cached tensor's sequence axis

    def extend(self, layer: int, dims: tuple[int, ...], *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new tokens' tensors (sequence axis dims[i] of each) and return the whole cached tensors."""
        if layer not in self._layers:
            self._layers[layer], self._dims[layer] = list(new), dims
        else:
            self._layers[layer] = [
                torch.cat((old, t), dim=d) for old, t, d in zip(self._layers[layer], new, dims, strict=True)
            ]
        return tuple(self._layers[layer])

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on (rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length={length} is invalid: allowed [0, {self.length}]")
        for layer, tensors in self._layers.items():
            self._layers[layer] = [t.narrow(d, 0, length) for t, d in zip(tensors, self._dims[layer], strict=True)]
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._layers.values() for t in ts)
