"""The routing of real text, recorded (moekit trace) and replayed against expert-cache policies (moekit cache-sim):
which routed experts each token asks for, layer after layer, in the order a decode step reads them.

A trace is one safetensors file: ids [tokens, layers, k] int32 (each token's chosen experts per MoE layer, in the
router's order) and a JSON header (model, MoE layers, experts per layer, bytes per expert). The simulator replays
it as a sequence of requests: token by token, each MoE layer's k experts at once (they are all needed before that
layer can run, so none of them may be evicted for another), against a pool of expert slots shared by all layers.
Policies: LRU, LFU, LFU with decay (recent use counts more: a per-expert score that halves every `half_life`
tokens), and Belady's optimum (evict the expert used again farthest in the future: the offline best)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class ExpertTrace:
    """ids [tokens, layers, k] int32; layers: the MoE layers' indices; experts: per layer; expert_bytes: bytes one
    routed expert's weights take (as the model holds them)."""

    ids: torch.Tensor
    layers: list[int]
    experts: int
    expert_bytes: int
    model: str = ""

    def save(self, path: Path) -> None:
        meta = {"layers": self.layers, "experts": self.experts, "expert_bytes": self.expert_bytes, "model": self.model}
        save_file(
            {"ids": self.ids.to(torch.int32).contiguous()}, str(path), metadata={"moekit_trace": json.dumps(meta)}
        )

    @classmethod
    def load(cls, path: Path) -> ExpertTrace:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["moekit_trace"])
            ids = load_file(str(path))["ids"]
        except Exception as e:  # safetensors raises its own error type; a missing header, a KeyError
            raise ValueError(f"{path}: not a moekit trace ({e})") from None
        return cls(ids.long(), meta["layers"], meta["experts"], meta["expert_bytes"], meta.get("model", ""))


@torch.no_grad()
def record_trace(model, ids_BT_list: list[torch.Tensor], name: str = "") -> ExpertTrace:
    """The experts each token of the given batches chose in every MoE layer (batches [B, T] of token ids, run
    through the model as prompts; tokens in batch order, row by row)."""
    blocks = {i: b for i, b in model.moe_blocks().items() if i < model.config.num_layers}
    if not blocks:
        raise ValueError("the model has no MoE layers: nothing to trace")
    rows = []
    for ids_BT in ids_BT_list:
        out = model(ids_BT, return_routing=True)
        per_layer = [out.moe[i].topk_ids_TK for i in blocks]
        if any(t is None for t in per_layer):
            raise ValueError("trace: the routing records no per-token choice (token-choice routers only)")
        rows.append(torch.stack(per_layer, dim=1))  # [T, layers, k]
    block = next(iter(blocks.values()))
    expert_bytes = sum(p[0].numel() * p.element_size() for p in block.experts.parameters())
    experts = block.cfg.num_experts
    return ExpertTrace(torch.cat(rows).int(), list(blocks), experts, expert_bytes, name)


def _requests(trace: ExpertTrace) -> list[list[tuple[int, int]]]:
    """Per (token, layer) the set of (layer, expert) keys that step needs."""
    ids = trace.ids.tolist()
    return [[(layer, e) for e in dict.fromkeys(choice)] for token in ids for layer, choice in enumerate(token)]


def simulate(trace: ExpertTrace, slots: int, policy: str, half_life: float = 64.0) -> dict:
    """Replay the trace against a pool of `slots` experts under `policy` (lru, lfu, lfu-decay, belady): hits,
    misses, hit rate, bytes read (misses x expert bytes)."""
    if slots < trace.ids.shape[2]:
        raise ValueError(f"{slots} slots cannot hold one layer's {trace.ids.shape[2]} experts: allowed at least k")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is unknown: allowed {', '.join(POLICIES)}")
    requests = _requests(trace)
    uses: dict = defaultdict(deque)  # key -> the steps that need it, upcoming (Belady's look-ahead)
    for step, needed in enumerate(requests):
        for key in needed:
            uses[key].append(step)
    cache: OrderedDict = OrderedDict()  # key -> (count, score, last token), least recent first
    hits = misses = 0
    decay = math.log(2) / half_life
    for step, needed in enumerate(requests):
        token = step // len(trace.layers)
        pinned = set(needed)
        for key in needed:
            uses[key].popleft()
        for key in needed:
            if key in cache:
                hits += 1
                cache.move_to_end(key)
                count, score, last = cache[key]
                cache[key] = (count + 1, score * math.exp(-decay * (token - last)) + 1.0, token)
                continue
            misses += 1
            if len(cache) >= slots:
                victims = [k for k in cache if k not in pinned]
                cache.pop(_victim(policy, victims, cache, token, decay, uses))
            cache[key] = (1, 1.0, token)
    total = hits + misses
    return {
        "policy": policy,
        "slots": slots,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / total if total else 0.0,
        "bytes_read": misses * trace.expert_bytes,
        "bytes_per_token": misses * trace.expert_bytes / max(trace.ids.shape[0], 1),
    }


POLICIES = ("lru", "lfu", "lfu-decay", "belady")


def _victim(policy: str, victims: list, cache: OrderedDict, token: int, decay: float, uses: dict) -> tuple[int, int]:
    """The key to evict among `victims` (in recency order, least recent first: ties go to it)."""
    if policy == "lru":
        return victims[0]
    if policy == "lfu":
        return min(victims, key=lambda k: cache[k][0])
    if policy == "lfu-decay":
        return min(victims, key=lambda k: cache[k][1] * math.exp(-decay * (token - cache[k][2])))
    return max(victims, key=lambda k: uses[k][0] if uses[k] else math.inf)  # belady: needed again last
