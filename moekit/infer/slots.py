"""The KV cache of a batch of independent sequences (a server's running requests): a fixed number of slots, each
with room for `context` tokens and its own length, so sequences at different positions decode in one batch.

Memory is slot-based (as llama.cpp's server slots): every layer's buffer is [slots, ..., context, ...], allocated
and zeroed on the first write of that layer. A forward pass runs on a view of
consecutive slots (`rows`); the engine keeps its running sequences in slots 0..n-1 by moving a sequence into a
slot freed below it, so a decode step's keys are a view of the buffers, never a gathered copy."""

from __future__ import annotations

import torch

from moekit._validate import check_int


class SlotKVCache:
    def __init__(self, slots: int, context: int) -> None:
        check_int("slots", slots, 1)
        check_int("context", context, 1)
        self.slots, self.context = slots, context
        self.lengths = [0] * slots  # tokens cached in each slot
        self._buffers: dict[int, list[torch.Tensor]] = {}
        self._dims: dict[int, tuple[int, ...]] = {}

    def rows(self, start: int, count: int) -> SlotView:
        """The cache of slots start..start+count-1 as one batch (what a forward pass takes as `cache`)."""
        if not (0 <= start and 1 <= count and start + count <= self.slots):
            raise ValueError(f"slots {start}..{start + count - 1} are invalid: allowed 0..{self.slots - 1}")
        return SlotView(self, start, count)

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's cached tokens into slot dst (src is then free)."""
        n = self.lengths[src]
        for layer, buffers in self._buffers.items():
            for buf, d in zip(buffers, self._dims[layer], strict=True):
                buf[dst].narrow(d - 1, 0, n).copy_(buf[src].narrow(d - 1, 0, n))
        self.lengths[dst], self.lengths[src] = n, 0

    def used_tokens(self) -> int:
        return sum(self.lengths)

    def _buffers_of(self, layer: int, dims: tuple[int, ...], new: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if layer not in self._buffers:
            bufs = []
            for t, d in zip(new, dims, strict=True):
                shape = list(t.shape)
                shape[0], shape[d] = self.slots, self.context
                bufs.append(t.new_zeros(shape))  # stale keys must be finite: masked, they still meet 0 * value
            self._buffers[layer], self._dims[layer] = bufs, dims
        return self._buffers[layer]


class SlotView:
    """Slots start..start+count-1 of a SlotKVCache, as the `cache` of one forward pass (batch row b = slot start+b).
    It serves the model as a KVCache does; where the rows hold different lengths (`ragged`) the model takes each
    row's positions from `positions_BT` and masks each row's keys by them."""

    def __init__(self, cache: SlotKVCache, start: int, count: int) -> None:
        self.cache, self.start, self.count = cache, start, count

    @property
    def lengths(self) -> list[int]:
        return self.cache.lengths[self.start : self.start + self.count]

    @property
    def length(self) -> int:
        """The longest row's length: the keys of a pass span length + T positions."""
        return max(self.lengths)

    @property
    def ragged(self) -> bool:
        return len(set(self.lengths)) > 1

    def positions_BT(self, t: int, device) -> torch.Tensor:
        lengths_B1 = torch.tensor(self.lengths, device=device)[:, None]
        return lengths_B1 + torch.arange(t, device=device)

    def advance(self, t: int) -> None:
        for slot in range(self.start, self.start + self.count):
            self.cache.lengths[slot] += t

    def has(self, layer: int) -> bool:
        return layer in self.cache._buffers and min(self.lengths) > 0

    def extend(self, layer: int, dims: tuple[int, ...], *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write each row's new tokens (sequence axis dims[i] of each tensor) after that row's cached ones and
        return views [rows, ..., length + T, ...] of the cached tensors (beyond a shorter row's own tokens: stale
        entries its causal mask hides)."""
        lengths, t = self.lengths, new[0].shape[dims[0]]
        end = max(lengths) + t
        if end > self.cache.context:
            raise ValueError(f"{end} tokens do not fit a slot: allowed context={self.cache.context}")
        positions_BT = self.positions_BT(t, new[0].device) if self.ragged else None
        out = []
        for buf, x, d in zip(self.cache._buffers_of(layer, dims, new), new, dims, strict=True):
            rows = buf.narrow(0, self.start, self.count)
            if positions_BT is None:
                rows.narrow(d, lengths[0], t).copy_(x)
            else:
                shape = [1] * x.dim()
                shape[0], shape[d] = self.count, t
                rows.scatter_(d, positions_BT.view(shape).expand_as(x), x)
            out.append(rows.narrow(d, 0, end))
        return tuple(out)

    def room(self, layer: int, count: int) -> list[torch.Tensor]:
        """The rows' whole buffers [rows, ...] (each row's slot), for a kernel that writes the new tokens itself
        at each row's length."""
        if not self.has(layer):
            raise ValueError(f"layer {layer} has no cache: allowed a layer that cached earlier tokens")
        if self.length + count > self.cache.context:
            raise ValueError(f"{self.length + count} tokens do not fit a slot: allowed context={self.cache.context}")
        return [buf.narrow(0, self.start, self.count) for buf in self.cache._buffers[layer]]
