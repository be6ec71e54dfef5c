"""Sparse upcycling (Komatsuzaki et al. 2023): an MoE made from a dense model, its experts copied from the dense
FFNs, so that at initialisation it computes exactly what the dense model computed.

granularity G > 1 splits each dense FFN into G slices of F/G hidden units (fine-grained experts) and makes
E / G copies of the set. The routing is then group-limited with one group per copy: a token picks top_k / G whole
copies and, inside each, all G slices with equal weights; with renormalised weights and a scaling factor of G the
slices add up to the dense FFN again. Router rows are equal within a copy at initialisation and drift apart in
training. Drop-upcycling (Nakamura et al. 2025) re-initialises a fraction of each expert's hidden units from the
statistics of the dense weights, trading the exact start for faster expert specialisation."""

from __future__ import annotations

from dataclasses import replace

import torch

from moekit._validate import check_float, check_int, fail
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.layers.ffn import FeedForward
from moekit.model.decoder import MoEDecoder
from moekit.routing.spec import RoutingSpec


def upcycle_config(
    dense: ModelConfig,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    layers: tuple[int, ...] | None = None,
    bias_update_rate: float = 0.0,
    aux_loss_coef: float = 0.0,
) -> ModelConfig:
    """The MoE config: `layers` (default: every dense layer) become MoE blocks of num_experts slices of width
    dense_hidden / granularity, softmax routing renormalised over the top_k."""
    f = dense.dense_hidden
    if f is None:
        fail("dense_hidden", None, "a dense model with dense FFN layers to upcycle")
    check_int("granularity", granularity, 1, f)
    if f % granularity:
        fail("granularity", granularity, f"a divisor of the dense FFN width {f}")
    check_int("num_experts", num_experts, granularity)
    check_int("top_k", top_k, granularity, num_experts)
    if num_experts % granularity or top_k % granularity:
        fail("num_experts/top_k", (num_experts, top_k), f"multiples of granularity={granularity}")
    dense_layers = tuple(i for i in range(dense.num_layers) if not dense.is_moe_layer(i))
    layers = dense_layers if layers is None else tuple(layers)
    for i in layers:
        if i not in dense_layers:
            fail("layers[]", i, f"a dense layer of the model ({list(dense_layers)})")
    check_float("bias_update_rate", bias_update_rate, 0.0)
    copies = num_experts // granularity
    spec = RoutingSpec(
        num_experts=num_experts,
        top_k=top_k,
        n_group=copies if granularity > 1 else 1,
        topk_group=top_k // granularity if granularity > 1 else 1,
        normalize=True,
        scaling_factor=float(granularity),
        selection_bias=bias_update_rate > 0,
    )
    layout = dense.moe.layout if dense.moe else ExpertLayout()
    if not layout.gated or layout.transposed or layout.gate_up != "concatenated":
        fail("layout", layout.describe(), "a gated, concatenated, untransposed FFN layout to copy experts from")
    moe = MoEConfig(
        routing=spec,
        expert_hidden=f // granularity,
        layout=layout,
        bias_update_rate=bias_update_rate,
        aux_loss_coef=aux_loss_coef,
    )
    keep_dense = len(layers) < dense.num_layers
    return replace(
        dense,
        moe=moe,
        moe_layers=tuple(sorted(set(dense.moe_layers) | set(layers))),
        dense_hidden=f if keep_dense else None,
        name=f"{dense.name or 'dense'}-upcycled-{num_experts}x{top_k}",
        extra={},
    )


@torch.no_grad()
def upcycle(
    model: MoEDecoder,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    drop_ratio: float = 0.0,
    seed: int = 0,
    **config_kwargs,
) -> MoEDecoder:
    """The upcycled MoE of a dense `model` (a new model; the dense one is untouched)."""
    check_float("drop_ratio", drop_ratio, 0.0, 1.0)
    cfg = upcycle_config(model.config, num_experts, top_k, granularity, **config_kwargs)
    torch.manual_seed(seed)
    moe_model = MoEDecoder(cfg).to(next(model.parameters()).dtype)
    new_blocks = set(moe_model.moe_blocks()) - set(model.moe_blocks())
    state = model.state_dict()
    own = moe_model.state_dict()
    for name, tensor in state.items():  # everything but the new MoE blocks is copied as it is
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer is None or int(layer) not in new_blocks or ".mlp." not in name:
            own[name].copy_(tensor)
    g = torch.Generator().manual_seed(seed)
    copies = num_experts // granularity
    slice_width = cfg.moe.expert_hidden
    for i in new_blocks:
        ffn: FeedForward = model.layers[i].mlp
        block = moe_model.layers[i].mlp
        gate_FD, up_FD, down_DF = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
        for e in range(num_experts):
            s = slice(e % granularity * slice_width, (e % granularity + 1) * slice_width)
            gate, up, down = gate_FD[s].clone(), up_FD[s].clone(), down_DF[:, s].clone()
            if drop_ratio > 0:
                _drop(gate, up, down, gate_FD, up_FD, down_DF, drop_ratio, g)
            block.experts.gate_up_proj[e].copy_(torch.cat([gate, up]))
            block.experts.down_proj[e].copy_(down)
        if granularity > 1:  # one router row per copy: its slices tie, and whole copies are chosen
            rows = block.router.weight.view(copies, granularity, -1)
            rows.copy_(rows[:, :1].expand_as(rows))
    return moe_model


def _drop(gate, up, down, gate_FD, up_FD, down_DF, ratio: float, g: torch.Generator) -> None:
    """Drop-upcycling: re-draw `ratio` of the slice's hidden units from N(mean, std) of the dense matrices."""
    n = gate.shape[0]
    idx = torch.randperm(n, generator=g)[: round(ratio * n)]
    for part, full, rows in ((gate, gate_FD, True), (up, up_FD, True), (down, down_DF, False)):
        mean, std = float(full.mean()), float(full.std())
        shape = (len(idx), part.shape[1]) if rows else (part.shape[0], len(idx))
        fresh = torch.randn(shape, generator=g, dtype=torch.float32).to(part.dtype) * std + mean
        if rows:
            part[idx] = fresh
        else:
            part[:, idx] = fresh
