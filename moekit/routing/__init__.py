"""Routing: the RoutingSpec, routers, balancing and routing metrics."""

from moekit.routing.balancing import (
    LossFreeBalancer,
    apply_capacity,
    expert_capacity,
    jitter,
    loss_free_bias_update,
    router_z_loss,
    sequence_aux_loss,
    switch_aux_loss,
)
from moekit.routing.expert_choice import expert_choice_capacity, expert_choice_route
from moekit.routing.hash import hash_route
from moekit.routing.metrics import dead_experts, load_cv, load_entropy, max_vio, routing_stats
from moekit.routing.plan import RoutingPlan
from moekit.routing.soft import SoftPlan, soft_route
from moekit.routing.spec import RoutingSpec
from moekit.routing.topk import topk_route

__all__ = [
    "LossFreeBalancer",
    "RoutingPlan",
    "RoutingSpec",
    "SoftPlan",
    "apply_capacity",
    "dead_experts",
    "expert_capacity",
    "expert_choice_capacity",
    "expert_choice_route",
    "hash_route",
    "jitter",
    "load_cv",
    "load_entropy",
    "loss_free_bias_update",
    "max_vio",
    "router_z_loss",
    "routing_stats",
    "sequence_aux_loss",
    "soft_route",
    "switch_aux_loss",
    "topk_route",
]
