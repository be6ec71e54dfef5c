"""The KV cache of a generation: per layer, what attention needs of every earlier token (keys and values for
GQA; the normalised latent and the rotated shared key for MLA, which is why MLA's cache is small)."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self) -> None:
        self.length = 0  # tokens already cached (the same in every layer)
        self._layers: dict[int, list[torch.Tensor]] = {}

    def extend(self, layer: int, dims: tuple[int, ...], *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new tokens' tensors (sequence axis dims[i] of each) and return the whole cached tensors."""
        if layer not in self._layers:
            self._layers[layer] = list(new)
        else:
            self._layers[layer] = [
                torch.cat((old, t), dim=d) for old, t, d in zip(self._layers[layer], new, dims, strict=True)
            ]
        return tuple(self._layers[layer])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._layers.values() for t in ts)
