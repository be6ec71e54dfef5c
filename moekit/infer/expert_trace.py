"""The routing of real text, recorded (moekit trace) and replayed against expert-cache policies (moekit cache-sim):
which routed experts each token asks for, layer after layer, in the order a decode step reads them.

A trace is one safetensors file: ids [tokens, layers, k] int32 (each token's chosen experts per MoE layer, in the
router's order) and a JSON header (model, MoE layers, experts per layer, bytes per expert). The simulator replays
it as a sequence of requests: token by token, each MoE layer's k experts at once (they are all needed before that
layer can run, so none of them may be evicted for another), against a pool of expert slots shared by all layers.
Policies: LRU, LFU, LFU with decay (recent use counts more: a per-expert score that halves every `half_life`
tokens), and Belady's optimum (evict the expert used again farthest in the future: the offline best). The trace
also records each layer's router applied one MoE layer early (Pre-gated MoE's prediction); with prefetch, the
simulator reads those experts ahead of their layer."""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moekit.infer.eviction import POLICIES, Eviction


@dataclass
class ExpertTrace:
    """ids [tokens, layers, k] int32; layers: the MoE layers' indices; experts: per layer; expert_bytes: bytes one
    routed expert's weights take (as the model holds them)."""

    ids: torch.Tensor
    layers: list[int]
    experts: int
    expert_bytes: int
    model: str = ""
    predicted: torch.Tensor | None = None  # [tokens, layers, k]: each layer's router on the previous MoE layer's input

    def save(self, path: Path) -> None:
        meta = {"layers": self.layers, "experts": self.experts, "expert_bytes": self.expert_bytes, "model": self.model}
        tensors = {"ids": self.ids.to(torch.int32).contiguous()}
        if self.predicted is not None:
            tensors["predicted"] = self.predicted.to(torch.int32).contiguous()
        save_file(tensors, str(path), metadata={"moekit_trace": json.dumps(meta)})

    def prediction_quality(self) -> dict | None:
        """Precision and recall of the early prediction (the next layer's router applied to this layer's input)
        against the experts each layer then chose, over the layers that have one."""
        if self.predicted is None:
            return None
        predicted, actual = self.predicted[:, 1:], self.ids[:, 1:]
        valid = predicted >= 0
        hits = (predicted.unsqueeze(-1) == actual.unsqueeze(-2)).any(-1) & valid
        return {"precision": float(hits.sum() / valid.sum().clamp_min(1)), "recall": float(hits.sum() / actual.numel())}

    @classmethod
    def load(cls, path: Path) -> ExpertTrace:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["moekit_trace"])
            tensors = load_file(str(path))
            ids = tensors["ids"]
        except Exception as e:  # safetensors raises its own error type; a missing header, a KeyError
            raise ValueError(f"{path}: not a moekit trace ({e})") from None
        predicted = tensors["predicted"].long() if "predicted" in tensors else None
        return cls(ids.long(), meta["layers"], meta["experts"], meta["expert_bytes"], meta.get("model", ""), predicted)


@torch.no_grad()
def record_trace(model, ids_BT_list: list[torch.Tensor], name: str = "") -> ExpertTrace:
    """The experts each token of the given batches chose in every MoE layer (batches [B, T] of token ids, run
    through the model as prompts; tokens in batch order, row by row)."""
    blocks = {i: b for i, b in model.moe_blocks().items() if i < model.config.num_layers}
    if not blocks:
        raise ValueError("the model has no MoE layers: nothing to trace")
    inputs: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda _, a, i=i: inputs.__setitem__(i, a[0])) for i, b in blocks.items()]
    rows, guesses = [], []
    try:
        for ids_BT in ids_BT_list:
            out = model(ids_BT, return_routing=True)
            per_layer = [out.moe[i].topk_ids_TK for i in blocks]
            if any(t is None for t in per_layer):
                raise ValueError("trace: the routing records no per-token choice (token-choice routers only)")
            rows.append(torch.stack(per_layer, dim=1))  # [T, layers, k]
            guesses.append(_early_choices(blocks, inputs, rows[-1]))
    finally:
        for h in hooks:
            h.remove()
    block = next(iter(blocks.values()))
    expert_bytes = sum(p[0].numel() * p.element_size() for p in block.experts.parameters())
    experts = block.cfg.num_experts
    return ExpertTrace(torch.cat(rows).int(), list(blocks), experts, expert_bytes, name, torch.cat(guesses).int())


def _early_choices(blocks: dict, inputs: dict, actual_TLK: torch.Tensor) -> torch.Tensor:
    """[T, layers, k]: for each MoE layer, its router applied to the previous MoE layer's input (what a prefetcher
    knows one layer early); -1 for the first layer and for routers that need more than the hidden state."""
    from moekit.routing.router import TokenChoiceRouter

    out = torch.full_like(actual_TLK, -1)
    order = list(blocks)
    for j in range(1, len(order)):
        router, x = blocks[order[j]].router, inputs[order[j - 1]]
        if type(router) is TokenChoiceRouter:
            out[:, j] = router(x.reshape(-1, x.shape[-1])).topk_ids_TK
    return out


def _requests(trace: ExpertTrace) -> list[list[tuple[int, int]]]:
    """Per (token, layer) the set of (layer, expert) keys that step needs."""
    ids = trace.ids.tolist()
    return [[(layer, e) for e in dict.fromkeys(choice)] for token in ids for layer, choice in enumerate(token)]


def simulate(trace: ExpertTrace, slots: int, policy: str, half_life: float = 64.0, prefetch: bool = False) -> dict:
    """Replay the trace against a pool of `slots` experts under `policy` (lru, lfu, lfu-decay, belady): hits,
    misses, hit rate, bytes read (misses x expert bytes). prefetch: after each layer, the next layer's predicted
    experts (trace.predicted) are read into the pool ahead of their use; reads of experts the layer then does not
    use are counted as wasted."""
    if slots < trace.ids.shape[2]:
        raise ValueError(f"{slots} slots cannot hold one layer's {trace.ids.shape[2]} experts: allowed at least k")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is unknown: allowed {', '.join(POLICIES)}")
    if prefetch and trace.predicted is None:
        raise ValueError("prefetch needs a trace with predictions: allowed a trace written by moekit trace")
    requests = _requests(trace)
    layers = len(trace.layers)
    guesses = trace.predicted.tolist() if prefetch else None
    uses: dict = defaultdict(deque)  # key -> the steps that need it, upcoming (Belady's look-ahead)
    for step, needed in enumerate(requests):
        for key in needed:
            uses[key].append(step)
    cache = Eviction(policy, half_life)
    hits = misses = fetched = wasted = 0

    def bring(key: tuple[int, int], token: int, pinned: set, ahead: bool = False) -> None:
        if len(cache) >= slots:
            victims = (k for k in cache.entries if k not in pinned)
            cache.remove(cache.victim(victims, token, lambda k: uses[k][0] if uses[k] else math.inf))
        cache.add(key, token, ahead)

    for step, needed in enumerate(requests):
        token, layer = divmod(step, layers)
        pinned = set(needed)
        for key in needed:
            uses[key].popleft()
        for key in needed:
            if key in cache:
                hits += 1
                cache.use(key, token)
                continue
            misses += 1
            bring(key, token, pinned)
        if guesses is not None and layer + 1 < layers:  # read the next layer's predicted experts ahead
            ahead = [(layer + 1, e) for e in dict.fromkeys(guesses[token][layer + 1]) if e >= 0]
            for key in ahead:
                if key not in cache:
                    fetched += 1
                    wasted += key not in requests[step + 1]
                    bring(key, token, set(ahead), ahead=True)
    total = hits + misses
    extra = {"prefetched": fetched, "prefetch_wasted": wasted} if prefetch else {}
    return {
        **extra,
        "policy": policy,
        "slots": slots,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / total if total else 0.0,
        "bytes_read": (misses + fetched) * trace.expert_bytes,
        "bytes_per_token": (misses + fetched) * trace.expert_bytes / max(trace.ids.shape[0], 1),
    }
