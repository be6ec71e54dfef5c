"""The routing probe: run real text through a model and report how each MoE layer spreads its tokens."""

from __future__ import annotations

import time

import torch

from moekit.model.count import count_parameters
from moekit.model.decoder import MoEDecoder
from moekit.routing.metrics import routing_stats


@torch.no_grad()
def probe_routing(model: MoEDecoder, tokens_BT: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """One forward pass; per MoE layer the load statistics (tokens per expert, MaxVio, entropy, CV, dead experts,
    dropped fraction), plus parameter counts and throughput. JSON-ready."""
    model.eval()
    start = time.perf_counter()
    out = model(tokens_BT, attention_mask, return_routing=True)
    seconds = time.perf_counter() - start
    layers = {}
    for i, info in out.moe.items():
        layers[str(i)] = routing_stats(info.requested_per_expert_E, info.dropped, info.assignments)
    n_tokens = int(tokens_BT.numel() if attention_mask is None else attention_mask.sum())
    targets, logits = tokens_BT[:, 1:], out.logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return {
        "model": model.config.name or model.config.family,
        "routing": model.config.moe.describe() if model.config.moe else "dense",
        "params": count_parameters(model),
        "tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else float("inf"),
        "loss": float(loss),
        "layers": layers,
    }
