"""Router modules: the learned (or fixed) part of routing. They own the router weights and the selection bias;
the math is in topk.py, expert_choice.py, soft.py and hash.py."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config.moe import MoEConfig
from moekit.routing.balancing import apply_capacity, jitter
from moekit.routing.expert_choice import expert_choice_route
from moekit.routing.hash import hash_route
from moekit.routing.plan import RoutingPlan
from moekit.routing.soft import SoftPlan, soft_route
from moekit.routing.topk import routing_probs, scores_from_logits, topk_route


def _check_input(x_TD: torch.Tensor, hidden_size: int) -> None:
    if x_TD.dim() != 2 or x_TD.shape[-1] != hidden_size:
        raise ValueError(f"router input shape {tuple(x_TD.shape)} is invalid: allowed [tokens, {hidden_size}]")


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    """Non-finite input shows in the (much smaller) logits; top-k over NaN would route silently wrong. One sum is
    enough to see any NaN or inf (and two ops, where isfinite().all() takes six: this runs at every decode step)."""
    if not math.isfinite(float(logits.detach().sum())):
        raise ValueError("router input contains NaN or inf: allowed finite values only")
    return logits


class TokenChoiceRouter(nn.Module):
    """weight [E, D] (+ bias [E]); selection_bias_E and its load counter load_E when the spec has a selection bias.
    shares: set by expert parallelism (moekit.distributed), the ranks whose shares of a batch capacity spans."""

    shares = None

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg, self.spec, self.hidden_size = cfg, cfg.routing, hidden_size
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None
        if self.spec.selection_bias:
            self.register_buffer("selection_bias_E", torch.zeros(cfg.num_experts, dtype=torch.float32))
            self.register_buffer("load_E", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        else:
            self.selection_bias_E = None
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.spec.router_dtype == "float32":
            b = None if self.bias is None else self.bias.float()
            return F.linear(x_TD.float(), self.weight.float(), b)
        return F.linear(x_TD, self.weight, self.bias)

    def forward(
        self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None, token_mask_T: torch.Tensor | None = None
    ) -> RoutingPlan:
        _check_input(x_TD, self.hidden_size)
        if self.training:
            x_TD = jitter(x_TD, self.cfg.jitter)
        logits_TE = _check_logits(self.logits(x_TD))
        topk_ids_TK, weights_TK, probs_TE = topk_route(logits_TE, self.spec, self.selection_bias_E)
        if self.training and self.selection_bias_E is not None:
            ids = topk_ids_TK if token_mask_T is None else topk_ids_TK[token_mask_T.reshape(-1).bool()]
            self.load_E += torch.bincount(ids.reshape(-1), minlength=self.spec.num_experts).float()
        plan = RoutingPlan.from_topk(
            topk_ids_TK, weights_TK, self.spec.num_experts, self.spec.apply_to, probs_TE, logits_TE
        )
        if self.cfg.capacity_factor is not None:
            plan = apply_capacity(plan, self.cfg.capacity_factor, self.cfg.drop_policy, self.shares)
        return plan


class ExpertChoiceRouter(TokenChoiceRouter):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the batch."""

    def forward(self, x_TD, token_ids_T=None, token_mask_T=None):
        _check_input(x_TD, self.hidden_size)
        if self.training:
            x_TD = jitter(x_TD, self.cfg.jitter)
        logits_TE = _check_logits(self.logits(x_TD))
        if token_mask_T is not None:  # padding is never chosen
            logits_TE = logits_TE.masked_fill(~token_mask_T.reshape(-1, 1).bool(), -1e9)
        return expert_choice_route(logits_TE, self.spec.top_k, self.cfg.capacity_factor or 1.0)


class HashRouter(nn.Module):
    """A fixed hash of the token id picks the experts; no weights."""

    selection_bias_E = None

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x_TD, token_ids_T=None, token_mask_T=None):
        if token_ids_T is None:
            raise ValueError("token_ids=None is invalid for router='hash': allowed the input token ids")
        return hash_route(token_ids_T.reshape(-1), self.cfg.num_experts, self.cfg.top_k)


class TokenTableRouter(TokenChoiceRouter):
    """DeepSeek-V4's hash layers: table_VK [vocab, k] (a buffer, loaded with the checkpoint) picks each token's
    experts by its id; the learned weight scores them as the spec says (scores, renormalisation, scaling)."""

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__(hidden_size, cfg)
        self.register_buffer("table_VK", torch.zeros(cfg.table_vocab, cfg.top_k, dtype=torch.long))

    def forward(self, x_TD, token_ids_T=None, token_mask_T=None):
        if token_ids_T is None:
            raise ValueError("token_ids=None is invalid for router='token_table': allowed the input token ids")
        _check_input(x_TD, self.hidden_size)
        logits_TE = _check_logits(self.logits(x_TD))
        scores_TE = scores_from_logits(logits_TE, self.spec)
        ids_TK = self.table_VK[token_ids_T.reshape(-1)]
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.spec.normalize:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + self.spec.normalize_eps)
        weights_TK = (weights_TK * self.spec.scaling_factor).to(x_TD.dtype)
        probs_TE = routing_probs(scores_TE, self.spec)
        return RoutingPlan.from_topk(ids_TK, weights_TK, self.spec.num_experts, self.spec.apply_to, probs_TE, logits_TE)


class SoftRouter(nn.Module):
    """Soft MoE slot parameters phi [E * slots_per_expert, D]."""

    selection_bias_E = None

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg, self.hidden_size = cfg, hidden_size
        self.weight = nn.Parameter(torch.empty(cfg.num_experts * cfg.slots_per_expert, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None = None) -> SoftPlan:
        _check_input(x_BTD.reshape(-1, x_BTD.shape[-1]), self.hidden_size)
        logits_BTS = _check_logits(F.linear(x_BTD.float(), self.weight.float()))
        return soft_route(logits_BTS, self.cfg.num_experts, token_mask_BT)


ROUTER_CLASSES = {
    "token_choice": TokenChoiceRouter,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftRouter,
    "hash": HashRouter,
    "token_table": TokenTableRouter,
}


def build_router(hidden_size: int, cfg: MoEConfig) -> nn.Module:
    return ROUTER_CLASSES[cfg.router](hidden_size, cfg)


def warn_causality(cfg: MoEConfig) -> None:
    """Expert choice and soft MoE see every token of a batch at once: in a causal LM, information leaks from later
    tokens into earlier ones (Wang et al. 2024, App. D), so training loss looks better than it is."""
    if cfg.breaks_causality:
        warnings.warn(
            f"router={cfg.router!r} breaks causality in a causal LM: a token's routing depends on later tokens, "
            "so training loss is optimistic and decoding differs from training",
            stacklevel=3,
        )


def warn_untrainable_router(cfg: MoEConfig) -> None:
    """Top-1 token choice with renormalised weights gives every token the weight s / s = 1: the router's scores
    never reach the loss, so only balancing terms (or nothing) train it."""
    if cfg.router == "token_choice" and cfg.routing.top_k == 1 and cfg.routing.normalize:
        warnings.warn(
            "top_k=1 with normalize=True makes every routing weight 1, so the language-model loss never trains the "
            "router: set normalize = false (Switch, Llama 4) to let it learn",
            stacklevel=3,
        )
