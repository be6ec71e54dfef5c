"""Which expert to evict from a pool of expert slots: the policies the runtime expert cache (expert_cache.py) runs
and the simulator (expert_trace.py) replays, in one place.

Every policy keeps, per cached expert, its use count, a score that decays with time and its last use, in recency
order. LRU evicts the least recently used; LFU the least used; LFU with decay the lowest score, each use adding 1
and the score halving every `half_life` tokens (recent routing weighs more, as a model's topic drifts); Belady's
optimum (simulator only: it knows the future) the expert needed again farthest ahead."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable

POLICIES = ("lru", "lfu", "lfu-decay", "belady")
ONLINE = POLICIES[:3]  # what a running model can use: Belady needs the future


class Eviction:
    """The bookkeeping of one pool under one policy. Keys are any hashable (moekit uses (layer, expert)); time is
    counted in tokens."""

    def __init__(self, policy: str, half_life: float = 64.0):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is unknown: allowed {', '.join(POLICIES)}")
        if not half_life > 0:
            raise ValueError(f"half_life={half_life} is invalid: allowed > 0 tokens")
        self.policy = policy
        self.decay = math.log(2) / half_life
        self.entries: OrderedDict[Hashable, tuple[int, float, float]] = OrderedDict()  # key -> (count, score, last)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: Hashable, token: float, ahead: bool = False) -> None:
        """A key brought in; ahead: read on a guess (prefetch), not yet used: the first to go under every policy
        (least recent, no uses) until a use makes it an ordinary entry."""
        self.entries[key] = (0, 0.0, token) if ahead else (1, 1.0, token)
        if ahead:
            self.entries.move_to_end(key, last=False)

    def use(self, key: Hashable, token: float) -> None:
        """A hit: the key becomes the most recent, its count and decayed score grow by one."""
        count, score, last = self.entries.pop(key)
        self.entries[key] = (count + 1, score * math.exp(-self.decay * (token - last)) + 1.0, token)

    def remove(self, key: Hashable) -> None:
        del self.entries[key]

    def victim(self, candidates: Iterable[Hashable], token: float, next_use=None) -> Hashable:
        """The key to evict among `candidates` (cached keys; ties go to the least recent). next_use(key): when the
        key is needed again (Belady only)."""
        allowed = set(candidates)
        victims = [k for k in self.entries if k in allowed]  # recency order, least recent first
        if not victims:
            raise ValueError("no expert can be evicted: every cached expert is in use")
        if self.policy == "lru":
            return victims[0]
        if self.policy == "lfu":
            return min(victims, key=lambda k: self.entries[k][0])
        if self.policy == "lfu-decay":
            return min(victims, key=lambda k: self.entries[k][1] * math.exp(-self.decay * (token - self.entries[k][2])))
        if next_use is None:
            raise ValueError(
                "policy 'belady' needs the future (the simulator only): allowed online lru, lfu, lfu-decay"
            )
        return max(victims, key=next_use)
