"""The MoE block: router -> dispatcher -> experts backend -> combine, plus shared experts and balancing losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.config.moe import MoEConfig
from moekit.dispatch.local import LocalDispatcher
from moekit.experts.backends import get_backend
from moekit.experts.weights import ExpertWeights
from moekit.layers.ffn import FeedForward, dense_layout
from moekit.routing.balancing import router_z_loss, sequence_aux_loss, switch_aux_loss
from moekit.routing.plan import RoutingPlan
from moekit.routing.router import build_router


@dataclass
class MoEInfo:
    """What one MoE block did on one batch, counted over real (unpadded) tokens.

    tokens_per_expert_E  assignments each expert processed (after drops); detached.
    assignments          (token, expert) pairs the router asked for, before drops.
    dropped              of those, how many capacity dropped.
    aux_loss             the weighted sum of this block's balancing losses (a scalar with gradient; 0 if none, and
                         0 under torch.no_grad, where nothing could learn from it).
    topk_ids_TK          the experts each real token chose (token choice only; detached), for co-activation.
    """

    tokens_per_expert_E: torch.Tensor
    assignments: int
    dropped: int
    aux_loss: torch.Tensor
    topk_ids_TK: torch.Tensor | None = None

    @property
    def requested_per_expert_E(self) -> torch.Tensor:
        """Assignments the router asked of each expert, before capacity drops: the load balancing acts on (after
        drops every count is capped at the capacity, which would make any router look balanced)."""
        if self.dropped == 0 or self.topk_ids_TK is None:
            return self.tokens_per_expert_E
        return torch.bincount(self.topk_ids_TK.flatten(), minlength=self.tokens_per_expert_E.numel())


class MoEBlock(nn.Module):
    """fused: None, or the block's faster step at inference installed from outside (moekit.infer.fast): x_BTD ->
    (y_BTD, MoEInfo), or None where it does not apply."""

    fused = None

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg, self.hidden_size = cfg, hidden_size
        self.router = build_router(hidden_size, cfg)
        self.experts = ExpertWeights(cfg.num_experts, hidden_size, cfg.expert_hidden, cfg.layout)
        self.shared_experts = None
        self.shared_expert_gate = None
        if cfg.num_shared_experts:
            self.shared_experts = FeedForward(hidden_size, cfg.shared_width, dense_layout(cfg.layout))
            if cfg.shared_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.backend = get_backend(cfg.backend, cfg.matmul)
        self.dispatcher = LocalDispatcher()

    def set_backend(self, name: str, matmul: str = "auto") -> None:
        """The experts backend by registry name; matmul: the grouped backend's matmul choice."""
        self.__dict__.pop("fused", None)  # a fused step computes what the default backend does
        self.backend = get_backend(name, matmul)

    def forward(
        self,
        x_BTD: torch.Tensor,
        token_ids_BT: torch.Tensor | None = None,
        token_mask_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEInfo]:
        """x_BTD [B, T, D] -> (y_BTD, info). token_ids feed hash routing; token_mask (True = real token) keeps padding
        out of the balancing losses, the statistics and soft MoE slots."""
        if x_BTD.dim() != 3 or x_BTD.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoE input shape {tuple(x_BTD.shape)} is invalid: allowed [batch, tokens, {self.hidden_size}]"
            )
        b, t, d = x_BTD.shape
        if self.fused is not None and token_mask_BT is None:
            out = self.fused(x_BTD)
            if out is not None:
                return out
        if self.cfg.router == "soft":
            y_BTD, info = self._soft(x_BTD, token_mask_BT)
        else:
            x_TD = x_BTD.reshape(-1, d)
            mask_T = None if token_mask_BT is None else token_mask_BT.reshape(-1).bool()
            ids_T = None if token_ids_BT is None else token_ids_BT.reshape(-1)
            plan = self.router(x_TD, ids_T, mask_T)
            y_TD = self.dispatcher.run(x_TD, plan, self.backend, self.experts)
            y_BTD = y_TD.view(b, t, d)
            info = self._info(plan, mask_T, b, t)
        if self.shared_experts is not None:
            shared_BTD = self.shared_experts(x_BTD)
            if self.shared_expert_gate is not None:
                shared_BTD = torch.sigmoid(self.shared_expert_gate(x_BTD)) * shared_BTD
            y_BTD = y_BTD + shared_BTD
        return y_BTD, info

    def _info(self, plan: RoutingPlan, mask_T: torch.Tensor | None, b: int, t: int) -> MoEInfo:
        cfg = self.cfg
        with torch.no_grad():
            if mask_T is None:
                counts_E = plan.tokens_per_expert_E
                real_tokens = plan.num_tokens
                kept = plan.expert_ids_N.numel()
            else:
                counts_E = torch.bincount(plan.expert_ids_N[mask_T[plan.token_ids_N]], minlength=cfg.num_experts)
                real_tokens = int(mask_T.sum())
                kept = int(counts_E.sum())
            asked = real_tokens * plan.topk_ids_TK.shape[1] if plan.topk_ids_TK is not None else kept
            chosen_TK = plan.topk_ids_TK
            if chosen_TK is not None and mask_T is not None:
                chosen_TK = chosen_TK[mask_T]
        aux = plan.weights_N.new_zeros((), dtype=torch.float32)
        if not torch.is_grad_enabled():  # inference: a loss nobody can backpropagate is not worth its ops
            return MoEInfo(counts_E.detach(), asked, asked - kept, aux, chosen_TK)
        if plan.topk_ids_TK is not None and plan.probs_TE is not None:
            if cfg.aux_loss_coef > 0:
                probs_TE, ids_TK, reduce = plan.probs_TE, plan.topk_ids_TK, self.dispatcher.sum_over_ranks
                aux = aux + switch_aux_loss(probs_TE, ids_TK, cfg.aux_loss_coef, mask_T, reduce)
            if cfg.seq_aux_loss_coef > 0:
                k = plan.topk_ids_TK.shape[1]
                aux = aux + sequence_aux_loss(
                    plan.probs_TE.view(b, t, -1),
                    plan.topk_ids_TK.view(b, t, k),
                    cfg.seq_aux_loss_coef,
                    None if mask_T is None else mask_T.view(b, t),
                )
        if cfg.z_loss_coef > 0 and plan.logits_TE is not None:
            aux = aux + router_z_loss(plan.logits_TE, cfg.z_loss_coef, mask_T)
        return MoEInfo(counts_E.detach(), asked, asked - kept, aux, chosen_TK)

    def _soft(self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None) -> tuple[torch.Tensor, MoEInfo]:
        b, t, d = x_BTD.shape
        e, spe = self.cfg.num_experts, self.cfg.slots_per_expert
        plan = self.router(x_BTD, token_mask_BT)
        # the router's weights are fp32: mixed into the activations in their dtype (bf16, fp64 models)
        dispatch_BTS, combine_BTS = plan.dispatch_BTS.to(x_BTD.dtype), plan.combine_BTS.to(x_BTD.dtype)
        slots_BSD = torch.einsum("bts,btd->bsd", dispatch_BTS, x_BTD)
        # Expert e takes its slots from every sequence: rows grouped by expert, b*spe each.
        x_SD = slots_BSD.view(b, e, spe, d).transpose(0, 1).reshape(e * b * spe, d)
        y_SD = self.backend(x_SD, [b * spe] * e, self.experts)
        y_BSD = y_SD.view(e, b, spe, d).transpose(0, 1).reshape(b, e * spe, d)
        y_BTD = torch.einsum("bts,bsd->btd", combine_BTS, y_BSD)
        counts_E = torch.full((e,), b * spe, dtype=torch.long, device=x_BTD.device)
        return y_BTD, MoEInfo(counts_E, b * spe * e, 0, x_BTD.new_zeros((), dtype=torch.float32))
