"""Token-choice routing math: logits -> (top-k ids, weights), as a RoutingSpec says. Pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.routing.spec import RoutingSpec


def scores_from_logits(logits_TE: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The score function over all experts (softmax, sigmoid or sqrt(softplus); sparsemixer balances on the
    softmax)."""
    if spec.score_func == "sigmoid":
        return torch.sigmoid(logits_TE)
    if spec.score_func == "sqrtsoftplus":
        return F.softplus(logits_TE).sqrt()
    return F.softmax(logits_TE, dim=-1)


def routing_probs(scores_TE: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """A distribution over experts per token (sums to 1), the P of the balancing losses. Sigmoid scores are
    normalised by their sum, as DeepSeek-V3's sequence-wise loss does (sqrt-softplus scores too)."""
    if spec.score_func in ("sigmoid", "sqrtsoftplus"):
        return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    return scores_TE


def limit_to_groups(choice_TE: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Mask (with -inf) every expert outside the topk_group best groups of each token."""
    num_tokens, num_experts = choice_TE.shape
    grouped_TGe = choice_TE.view(num_tokens, spec.n_group, num_experts // spec.n_group)
    if spec.group_score == "max":
        group_scores_TG = grouped_TGe.max(dim=-1).values
    else:
        group_scores_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
    best_groups = group_scores_TG.topk(spec.topk_group, dim=-1).indices
    allowed_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups, True)
    return grouped_TGe.masked_fill(~allowed_TG.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)


def sparsemixer_route(logits_TE: torch.Tensor, top_k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's SparseMixer at inference: pick the best remaining expert k times; its weight is the softmax,
    at its own index, over the remaining logits s with (best - s) / max(|s|, best) <= 2·eps."""
    remaining_TE = logits_TE
    ids, weights = [], []
    for _ in range(top_k):
        best_T1, best_id_T1 = remaining_TE.max(dim=-1, keepdim=True)
        factor_TE = logits_TE.abs().clamp(min=best_T1)
        far_TE = (best_T1 - logits_TE) / factor_TE > 2 * eps
        gates_TE = F.softmax(remaining_TE.masked_fill(far_TE, float("-inf")), dim=-1)
        ids.append(best_id_T1)
        weights.append(gates_TE.gather(-1, best_id_T1))
        remaining_TE = remaining_TE.scatter(-1, best_id_T1, float("-inf"))
    return torch.cat(ids, dim=-1), torch.cat(weights, dim=-1)


def topk_route(
    logits_TE: torch.Tensor, spec: RoutingSpec, selection_bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing. Returns (topk_ids_TK, topk_weights_TK, probs_TE), weights in the logits' dtype."""
    logits = logits_TE.float() if spec.router_dtype == "float32" else logits_TE
    if spec.score_func == "sparsemixer":
        topk_ids_TK, weights_TK = sparsemixer_route(logits, spec.top_k, spec.sparsemixer_eps)
        return topk_ids_TK, weights_TK.to(logits_TE.dtype), F.softmax(logits, dim=-1)
    if spec.softmax_after_topk:
        choice_TE = logits
        scores_TE = F.softmax(logits, dim=-1)
    else:
        scores_TE = scores_from_logits(logits, spec)
        choice_TE = scores_TE
    if selection_bias_E is not None:
        choice_TE = choice_TE + selection_bias_E.to(choice_TE.dtype)
    if spec.n_group > 1:
        choice_TE = limit_to_groups(choice_TE, spec)
    topk_ids_TK = choice_TE.topk(spec.top_k, dim=-1).indices
    if spec.softmax_after_topk:
        weights_TK = F.softmax(logits.gather(1, topk_ids_TK), dim=-1)
    else:
        weights_TK = scores_TE.gather(1, topk_ids_TK)
    if spec.normalize:
        if spec.normalize_p == 1.0:
            norm_T1 = weights_TK.sum(-1, keepdim=True)
        else:
            norm_T1 = weights_TK.norm(p=spec.normalize_p, dim=-1, keepdim=True)
        weights_TK = weights_TK / (norm_T1 + spec.normalize_eps)
    if spec.scaling_factor != 1.0:
        weights_TK = weights_TK * spec.scaling_factor
    return topk_ids_TK, weights_TK.to(logits_TE.dtype), routing_probs(scores_TE, spec)
