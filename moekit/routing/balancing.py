"""Load balancing, each piece usable from any training loop: Switch/GShard aux loss (per micro-batch or per
sequence), router z-loss, capacity with token dropping, multiplicative jitter, and the auxiliary-loss-free bias."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from moekit._validate import check_choice, check_float
from moekit.routing.plan import RoutingPlan


def switch_aux_loss(
    probs_TE: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    alpha: float,
    token_mask_T: torch.Tensor | None = None,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """alpha * E * sum_e f_e * P_e over the given tokens.

    f_e: fraction of the T*K assignments that chose e (no gradient); P_e: mean routing probability of e (carries
    the gradient). Normalised so that perfectly uniform routing scores exactly alpha, whatever k is.
    sum_over_ranks: f from the whole batch of the ranks that share it (expert parallelism): with P from each rank's
    share, the ranks' mean loss is the whole batch's (equal shares)."""
    num_experts = probs_TE.shape[-1]
    if token_mask_T is not None:
        keep = token_mask_T.reshape(-1).bool()
        probs_TE, topk_ids_TK = probs_TE[keep], topk_ids_TK[keep]
    with torch.no_grad():
        counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
        stats = torch.cat((counts_E, counts_E.new_full((1,), topk_ids_TK.numel())))
        stats = sum_over_ranks(stats) if sum_over_ranks is not None else stats  # one collective for both
        f_E = stats[:-1] / stats[-1].clamp_min(1)
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    p_E = probs_TE.mean(0)
    return alpha * num_experts * (f_E * p_E).sum()


def sequence_aux_loss(
    probs_BTE: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    alpha: float,
    token_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the Switch loss of each sequence alone, averaged over sequences.
    Pushes every single sequence towards uniform expert use."""
    num_experts = probs_BTE.shape[-1]
    top_k = topk_ids_BTK.shape[-1]
    if token_mask_BT is None:
        mask_BT = torch.ones(probs_BTE.shape[:2], dtype=probs_BTE.dtype, device=probs_BTE.device)
    else:
        mask_BT = token_mask_BT.to(probs_BTE.dtype)
    n_B = mask_BT.sum(1)
    with torch.no_grad():
        onehot_BTE = torch.zeros_like(probs_BTE).scatter_add_(
            2, topk_ids_BTK, torch.ones(topk_ids_BTK.shape, dtype=probs_BTE.dtype, device=probs_BTE.device)
        )
        f_BE = (onehot_BTE * mask_BT.unsqueeze(-1)).sum(1) / (n_B * top_k).clamp_min(1).unsqueeze(-1)
    p_BE = (probs_BTE * mask_BT.unsqueeze(-1)).sum(1) / n_B.clamp_min(1).unsqueeze(-1)
    per_seq_B = num_experts * (f_BE * p_BE).sum(-1)
    valid_B = n_B > 0
    return alpha * per_seq_B[valid_B].mean() if bool(valid_B.any()) else probs_BTE.sum() * 0.0


def router_z_loss(logits_TE: torch.Tensor, coef: float, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's z-loss: coef * mean over tokens of logsumexp(logits)^2. Keeps router logits small."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1) ** 2
    if token_mask_T is not None:
        z_T = z_T[token_mask_T.reshape(-1).bool()]
    return coef * z_T.mean() if z_T.numel() else logits_TE.sum() * 0.0


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(k * T * capacity_factor / E): the most assignments one expert takes."""
    check_float("capacity_factor", capacity_factor, 0.0, lo_open=True)
    return math.ceil(top_k * num_tokens * capacity_factor / num_experts)


def apply_capacity(plan: RoutingPlan, capacity_factor: float, policy: str = "position", shares=None) -> RoutingPlan:
    """Drop the assignments beyond each expert's capacity. A token that loses all its experts passes through on the
    residual only.

    policy 'position': first choices of all tokens before second choices, earlier tokens first within a choice
    (GShard/Switch). policy 'score': the highest-weighted assignments first. shares: the ranks holding contiguous
    equal shares of one batch (expert parallelism: rank, ranks, all_gather), whose capacity and drops are the whole
    batch's as one process computes them (policy 'position')."""
    check_choice("drop_policy", policy, ("position", "score"))
    if shares is not None and shares.ranks > 1:
        return _shared_capacity(plan, capacity_factor, policy, shares)
    capacity = expert_capacity(plan.num_tokens, plan.num_experts, plan.num_slots, capacity_factor)
    n = plan.expert_ids_N.numel()
    if policy == "position":
        priority_N = plan.slot_N * plan.num_tokens + plan.token_ids_N
        by_priority = torch.argsort(priority_N, stable=True)
    else:
        by_priority = torch.argsort(plan.weights_N.detach().float(), descending=True, stable=True)
    # Group by expert, keeping priority order inside each expert's group.
    grouped = by_priority[torch.argsort(plan.expert_ids_N[by_priority], stable=True)]
    counts_E = torch.bincount(plan.expert_ids_N, minlength=plan.num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank = torch.arange(n, device=grouped.device) - starts_E[plan.expert_ids_N[grouped]]
    keep_N = torch.zeros(n, dtype=torch.bool, device=grouped.device)
    keep_N[grouped] = rank < capacity
    return plan.select(keep_N)


def _shared_capacity(plan: RoutingPlan, capacity_factor: float, policy: str, shares) -> RoutingPlan:
    """apply_capacity over the ranks' shares: expert e keeps the capacity's worth of the whole batch's assignments
    in position order (slot, then rank, then token): this rank's (slot j, e) assignments come after every rank's
    earlier slots and the earlier ranks' slot j, all known from one all-gather of the counts per (slot, expert)."""
    if policy != "position":
        raise ValueError(f"drop_policy={policy!r} with expert parallelism is unsupported: allowed 'position'")
    k, e, t = plan.num_slots, plan.num_experts, plan.num_tokens
    capacity = expert_capacity(t * shares.ranks, e, k, capacity_factor)
    group_N = plan.slot_N * e + plan.expert_ids_N  # (slot, expert)
    counts_KE = torch.bincount(group_N, minlength=k * e).view(k, e)
    all_WKE = shares.all_gather(counts_KE)
    every_KE = all_WKE.sum(0)
    before_KE = every_KE.cumsum(0) - every_KE + all_WKE[: shares.rank].sum(0)
    allowance = (capacity - before_KE).clamp_min(0).flatten()
    order = torch.argsort(group_N * t + plan.token_ids_N, stable=True)  # by (slot, expert), then token
    starts = torch.cumsum(counts_KE.flatten(), 0) - counts_KE.flatten()
    keep_N = torch.zeros_like(plan.expert_ids_N, dtype=torch.bool)
    keep_N[order] = (
        torch.arange(order.numel(), device=order.device) - starts[group_N[order]] < allowance[group_N[order]]
    )
    return plan.select(keep_N)


def jitter(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Multiplicative jitter: x * U[1 - eps, 1 + eps] (Switch Transformer; training only)."""
    if eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def loss_free_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """One auxiliary-loss-free step (Wang et al. 2024, Alg. 1): b_e += u * sign(mean load - load_e).
    Over-loaded experts get a lower bias, under-loaded a higher one. Updates in place and returns bias_E."""
    load = load_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load.mean() - load))
    return bias_E


class LossFreeBalancer:
    """Drives the auxiliary-loss-free bias of routers that have one.

    Each router counts the experts it selects while training (over every micro-batch); call step() once after
    each optimizer step: the bias moves by u * sign(mean - load) and the counts reset, so gradient accumulation
    sees the load of the whole step. The bias is a buffer, never a parameter: no optimizer touches it. Under
    torch.distributed the counts are summed over ranks first, so every rank applies the same update.
    """

    def __init__(self, routers: Iterable[torch.nn.Module], rate: float = 1e-3):
        self.routers = [r for r in routers if getattr(r, "selection_bias_E", None) is not None]
        self.rate = check_float("bias_update_rate", rate, 0.0)

    @torch.no_grad()
    def step(self) -> None:
        for router in self.routers:
            load_E = router.load_E.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load_E)
            if load_E.sum() > 0:
                loss_free_bias_update(router.selection_bias_E, load_E, self.rate)
            router.load_E.zero_()
