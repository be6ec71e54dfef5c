"""Routers and their MoE blocks against plain per-token (or per-expert) references written with Python loops:
token choice picks the best k within the best groups, expert choice each expert's top-C tokens, and the blocks of
expert choice, hash routing and soft MoE compute exactly their papers' sums."""

import itertools

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_routing_props import specs

from moekit import MoEBlock, MoEConfig, RoutingSpec
from moekit.routing import expert_choice_route, topk_route
from moekit.routing.expert_choice import expert_choice_capacity
from moekit.routing.hash import hash_route


def _best_k_within_groups(choice_E: list[float], spec: RoutingSpec) -> set[int]:
    """The k experts with the highest choice scores among those in the topk_group best groups."""
    e, per = spec.num_experts, spec.num_experts // spec.n_group
    groups = [choice_E[g * per : (g + 1) * per] for g in range(spec.n_group)]
    if spec.group_score == "max":
        group_scores = [max(g) for g in groups]
    else:
        group_scores = [sum(sorted(g)[-2:]) for g in groups]
    best = sorted(range(spec.n_group), key=lambda g: -group_scores[g])[: spec.topk_group]
    allowed = [i for i in range(e) if i // per in best] if spec.n_group > 1 else list(range(e))
    return set(sorted(allowed, key=lambda i: -choice_E[i])[: spec.top_k])


@settings(max_examples=80, deadline=None)
@given(spec=specs(), seed=st.integers(0, 10_000))
def test_topk_takes_the_best_k_within_the_best_groups(spec, seed):
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(12, spec.num_experts, generator=g, dtype=torch.float64) * 3
    bias_E = torch.randn(spec.num_experts, generator=g, dtype=torch.float64) if spec.selection_bias else None
    ids_TK, weights_TK, _ = topk_route(logits_TE, spec, bias_E)
    for t in range(logits_TE.shape[0]):
        if spec.softmax_after_topk:
            choice = logits_TE[t]
        elif spec.score_func == "sigmoid":
            choice = torch.sigmoid(logits_TE[t])
        else:
            choice = torch.softmax(logits_TE[t], -1)
        if bias_E is not None:
            choice = choice + bias_E
        assert set(ids_TK[t].tolist()) == _best_k_within_groups(choice.tolist(), spec)


@settings(max_examples=40, deadline=None)
@given(e=st.integers(2, 8), tokens=st.integers(1, 30), k=st.integers(1, 3), cf=st.sampled_from([0.5, 1.0, 2.0]))
def test_expert_choice_takes_each_experts_top_c_tokens(e, tokens, k, cf):
    k = min(k, e)  # (one expert: every score is 1, a tie)
    logits_TE = torch.randn(tokens, e, dtype=torch.float64)
    plan = expert_choice_route(logits_TE, k, cf)
    probs_TE = torch.softmax(logits_TE, -1)
    c = expert_choice_capacity(tokens, e, k, cf)
    for expert in range(e):
        mine = plan.expert_ids_N == expert
        best = sorted(range(tokens), key=lambda t: -float(probs_TE[t, expert]))[:c]
        assert set(plan.token_ids_N[mine].tolist()) == set(best)
        torch.testing.assert_close(plan.weights_N[mine], probs_TE[plan.token_ids_N[mine], expert])


def _expert(block: MoEBlock, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e of a block with the default layout (concatenated gate/up [2F, D], down [D, F], SwiGLU) on one row."""
    w_up, w_down = block.experts.gate_up_proj[e], block.experts.down_proj[e]
    gate, up = (w_up @ x_D).chunk(2)
    return w_down @ (F.silu(gate) * up)


def _block(router: str, **kw) -> MoEBlock:
    torch.manual_seed(0)
    cfg = MoEConfig(routing=RoutingSpec(num_experts=6, top_k=2), expert_hidden=12, router=router, **kw)
    return MoEBlock(16, cfg).double().eval()


def test_expert_choice_block_sums_each_tokens_choosers():
    block, x_BTD = _block("expert_choice", capacity_factor=1.0), torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        y_BTD, _ = block(x_BTD)
        x_TD = x_BTD.reshape(-1, 16)
        plan = expert_choice_route(block.router.logits(x_TD), 2, 1.0)
        ref_TD = torch.zeros_like(x_TD)
        for t, e, w in zip(plan.token_ids_N.tolist(), plan.expert_ids_N.tolist(), plan.weights_N, strict=True):
            ref_TD[t] += w * _expert(block, e, x_TD[t])
    torch.testing.assert_close(y_BTD.reshape(-1, 16), ref_TD, rtol=1e-10, atol=1e-12)


def test_hash_block_averages_the_hashed_experts():
    block = _block("hash")
    ids_BT = torch.randint(0, 500, (2, 7))
    x_BTD = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        y_BTD, info = block(x_BTD, ids_BT)
        experts_TK = hash_route(ids_BT.reshape(-1), 6, 2).expert_ids_N.view(-1, 2)
        for (b, t), experts in zip(itertools.product(range(2), range(7)), experts_TK.tolist(), strict=True):
            ref_D = sum(_expert(block, e, x_BTD[b, t]) for e in experts) / 2
            torch.testing.assert_close(y_BTD[b, t], ref_D, rtol=1e-10, atol=1e-12)
            assert experts == hash_route(ids_BT[b, t : t + 1], 6, 2).expert_ids_N.tolist()  # per token, alone
    assert info.tokens_per_expert_E.sum() == 2 * 7 * 2


def test_soft_moe_block_mixes_tokens_into_slots_and_slots_into_tokens():
    block = _block("soft", slots_per_expert=2)
    x_BTD = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y_BTD, _ = block(x_BTD)
        phi_SD = block.router.weight  # [E * slots, D]
        for b in range(2):
            logits_TS = x_BTD[b].float() @ phi_SD.float().t()  # the router's precision: fp32
            dispatch_TS, combine_TS = torch.softmax(logits_TS, 0).double(), torch.softmax(logits_TS, 1).double()
            slots = [sum(dispatch_TS[t, s] * x_BTD[b, t] for t in range(5)) for s in range(12)]
            outs = [_expert(block, s // 2, slots[s]) for s in range(12)]
            for t in range(5):
                ref_D = sum(combine_TS[t, s] * outs[s] for s in range(12))
                torch.testing.assert_close(y_BTD[b, t], ref_D, rtol=1e-9, atol=1e-12)
