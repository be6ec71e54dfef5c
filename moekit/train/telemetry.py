"""Routing telemetry of a training run: per MoE layer, the load of each step and, over the validation set, the
global load (MaxVio_global), entropy, dead experts and expert co-activation. Load = what the router asked of each
expert, before any capacity drops."""

from __future__ import annotations

import torch

from moekit.layers.moe import MoEInfo
from moekit.routing.metrics import dead_experts, load_entropy, max_vio


def coactivation_EE(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, E] counts of tokens that chose both experts i and j (the diagonal: tokens that chose i)."""
    onehot_TE = torch.zeros(topk_ids_TK.shape[0], num_experts, dtype=torch.float32)
    onehot_TE.scatter_(1, topk_ids_TK.cpu(), 1.0)
    return (onehot_TE.T @ onehot_TE).round().long()


class LoadAccumulator:
    """Sums expert loads (and optionally co-activation) per layer over several forward passes."""

    def __init__(self, coactivation: bool = False):
        self.coactivation = coactivation
        self.counts: dict[int, torch.Tensor] = {}
        self.pairs: dict[int, torch.Tensor] = {}
        self.assignments: dict[int, int] = {}
        self.dropped: dict[int, int] = {}

    def add(self, infos: dict[int, MoEInfo]) -> None:
        for layer, info in infos.items():
            counts = info.requested_per_expert_E.detach().cpu().long()
            self.counts[layer] = self.counts.get(layer, 0) + counts
            self.assignments[layer] = self.assignments.get(layer, 0) + info.assignments
            self.dropped[layer] = self.dropped.get(layer, 0) + info.dropped
            if self.coactivation and info.topk_ids_TK is not None:
                pairs = coactivation_EE(info.topk_ids_TK, counts.numel())
                self.pairs[layer] = self.pairs.get(layer, 0) + pairs

    def max_vio(self) -> float:
        """Mean over layers of each layer's MaxVio."""
        values = [max_vio(c) for c in self.counts.values()]
        return sum(values) / len(values) if values else 0.0

    def dropped_fraction(self) -> float:
        asked = sum(self.assignments.values())
        return sum(self.dropped.values()) / asked if asked else 0.0

    def layers(self) -> dict[str, dict]:
        out = {}
        for layer, c in self.counts.items():
            entry = {
                "tokens_per_expert": c.tolist(),
                "max_vio": max_vio(c),
                "entropy": load_entropy(c),
                "dead_experts": dead_experts(c),
            }
            if layer in self.pairs:
                entry["coactivation"] = self.pairs[layer].tolist()
            out[str(layer)] = entry
        return out
