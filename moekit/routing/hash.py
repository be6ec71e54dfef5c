"""Hash routing (Roller et al. 2021): a fixed hash of the token id picks the experts. A pure function."""

from __future__ import annotations

import torch

from moekit._validate import check_int
from moekit.routing.plan import RoutingPlan


def hash_route(token_ids_T: torch.Tensor, num_experts: int, top_k: int = 1) -> RoutingPlan:
    """Hash layers (Roller et al. 2021): a fixed hash of the token id picks the experts; weights 1/k. A baseline
    with no learned router."""
    check_int("top_k", top_k, 1, num_experts)
    # Knuth's multiplicative hash spreads consecutive ids; k consecutive experts from there are always distinct.
    first_T = (token_ids_T.long() * 2654435761 % (2**32)) % num_experts
    topk_ids_TK = (first_T.unsqueeze(1) + torch.arange(top_k, device=token_ids_T.device)) % num_experts
    weights_TK = torch.full(topk_ids_TK.shape, 1.0 / top_k, device=token_ids_T.device)
    return RoutingPlan.from_topk(topk_ids_TK, weights_TK, num_experts)
