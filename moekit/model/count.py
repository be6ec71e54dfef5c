"""Parameter counts of a built model (works on the `meta` device, so a 671B config costs no memory), split by
part, total and active per token. The planner and `moekit inspect` use this one path.

Conventions, since publishers differ: `total` and `active` count everything the forward pass uses, embedding
and output head included (DeepSeek-V3's 671B / 37B, Mixtral's 46.7B / 12.9B). `active_without_embeddings` leaves
out the input embedding and the output head (Qwen1.5-MoE's "2.0B non-embedding"); `active_without_input_embedding`
leaves out only the input embedding (the output head is a real matmul per token; GPT-OSS's and DeepSeek's
36.6B). Multi-token-prediction modules are counted apart (`mtp`, and `total_with_mtp`, which also counts the copies
of the embedding and head that DeepSeek-V3 checkpoints store beside the MTP layer: its published 685B)."""

from __future__ import annotations

from torch import nn

from moekit.layers.ffn import FeedForward
from moekit.layers.hyper import HyperConnection, HyperHead
from moekit.layers.linear_attention import GatedRMSNorm
from moekit.layers.mamba import GroupGatedRMSNorm
from moekit.layers.moe import MoEBlock
from moekit.layers.norm import OffsetRMSNorm, RMSNorm

PARTS = (
    "embedding",
    "output_head",
    "attention",
    "dense_ffn",
    "routed_experts",
    "shared_experts",
    "routers",
    "norms",
    "hyper_connections",
)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{part: count} for PARTS and mtp, plus total, active, active_without_embeddings,
    active_without_input_embedding, total_with_mtp. Tied weights count once (in the embedding)."""
    seen: set[int] = set()

    def take(params) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    counts = dict.fromkeys(PARTS, 0)
    counts["embedding"] = take(model.embed_tokens.parameters())
    counts["output_head"] = take(model.lm_head.parameters())
    mtp_modules = getattr(model, "mtp", [])
    mtp = sum(take(m.parameters()) for m in mtp_modules)
    active_routed = 0
    for module in model.modules():
        if isinstance(module, MoEBlock):
            routed = take(module.experts.parameters())
            counts["routed_experts"] += routed
            active_routed += routed * module.cfg.top_k // module.cfg.num_experts
            counts["shared_experts"] += take(module.shared_experts.parameters()) if module.shared_experts else 0
            counts["shared_experts"] += take(module.shared_expert_gate.parameters()) if module.shared_expert_gate else 0
            counts["routers"] += take(module.router.parameters())
    for name, module in model.named_modules():
        if isinstance(module, (HyperConnection, HyperHead)):  # DeepSeek-V4's stream mixing
            counts["hyper_connections"] += take(module.parameters())
        elif isinstance(module, (RMSNorm, OffsetRMSNorm, GatedRMSNorm, GroupGatedRMSNorm, nn.LayerNorm)):
            counts["norms"] += take(module.parameters())
        elif isinstance(module, FeedForward):
            counts["dense_ffn"] += take(module.parameters())
        elif name.endswith(("self_attn", "linear_attn", "mamba")):
            counts["attention"] += take(p for n, p in module.named_parameters() if "norm" not in n)
    other = take(model.parameters())
    if other:
        raise RuntimeError(f"{other} parameters belong to no counted part")  # a new module kind: name its part
    total = sum(counts.values())
    active = total - counts["routed_experts"] + active_routed
    counts.update(
        mtp=mtp,
        total=total,
        total_with_mtp=total + mtp + (counts["embedding"] + counts["output_head"]) * len(mtp_modules),
        active=active,
        active_without_embeddings=active - counts["embedding"] - counts["output_head"],
        active_without_input_embedding=active - counts["embedding"],
    )
    return counts
