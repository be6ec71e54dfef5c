"""Parameter counts of a built model: total, and active per token (token-choice routing: k of E experts)."""

from __future__ import annotations

from torch import nn

from moekit.layers.moe import MoEBlock


def count_parameters(model: nn.Module) -> dict[str, int]:
    """total, active (k/E of every routed expert tensor), routed_experts, embedding, and active_without_embeddings.
    Tied weights count once."""
    seen: set[int] = set()

    def numel(params) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    routed = active_routed = 0
    for block in (m for m in model.modules() if isinstance(m, MoEBlock)):
        n = numel(block.experts.parameters())
        routed += n
        active_routed += n * block.cfg.top_k // block.cfg.num_experts
    embedding = numel(model.embed_tokens.parameters()) if hasattr(model, "embed_tokens") else 0
    rest = numel(model.parameters())
    total = routed + embedding + rest
    active = total - routed + active_routed
    return {
        "total": total,
        "active": active,
        "routed_experts": routed,
        "embedding": embedding,
        "active_without_embeddings": active - embedding,
    }
