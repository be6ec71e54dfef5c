"""Router invariants as property tests."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.routing import RoutingPlan, RoutingSpec, apply_capacity, expert_choice_route, soft_route, topk_route
from moekit.routing.balancing import expert_capacity
from moekit.routing.expert_choice import expert_choice_capacity
from moekit.routing.hash import hash_route

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def specs(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(1, 6))
    if n_group > 1:
        per_group = max(per_group, 2)
    e = n_group * per_group
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * per_group if n_group > 1 else e))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    return RoutingSpec(
        num_experts=e,
        top_k=k,
        score_func=score,
        softmax_after_topk=score == "softmax" and draw(st.booleans()),
        n_group=n_group,
        topk_group=topk_group,
        group_score=draw(st.sampled_from(["max", "top2_sum"])),
        selection_bias=draw(st.booleans()),
        normalize=draw(st.booleans()),
        scaling_factor=draw(st.sampled_from([1.0, 2.5])),
    )


@SETTINGS
@given(spec=specs(), tokens=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_topk_invariants(spec, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, spec.num_experts, generator=g) * 3
    bias = torch.randn(spec.num_experts, generator=g) if spec.selection_bias else None
    ids, weights, probs = topk_route(logits, spec, bias)
    assert ids.shape == weights.shape == (tokens, spec.top_k)
    # ids distinct per token, weights non-negative
    assert all(len(set(row)) == spec.top_k for row in ids.tolist())
    assert (weights >= 0).all()
    # probs are a distribution
    torch.testing.assert_close(probs.sum(-1), torch.ones(tokens))
    if spec.normalize or spec.softmax_after_topk:
        torch.testing.assert_close(weights.sum(-1), torch.full((tokens,), spec.scaling_factor))
    # group limits respected
    if spec.n_group > 1:
        per_group = spec.num_experts // spec.n_group
        groups_used = [len({i // per_group for i in row}) for row in ids.tolist()]
        assert max(groups_used) <= spec.topk_group


@SETTINGS
@given(spec=specs(), seed=st.integers(0, 10_000))
def test_selection_bias_changes_experts_not_weights(spec, seed):
    if spec.softmax_after_topk:
        return  # that family has no selection bias
    spec = RoutingSpec(**{**spec.__dict__, "selection_bias": True})
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, spec.num_experts, generator=g)
    ids0, w0, _ = topk_route(logits, spec, torch.zeros(spec.num_experts))
    # A bias that only reorders experts: weights of the chosen experts are still their unbiased scores.
    bias = torch.randn(spec.num_experts, generator=g) * 10
    ids1, w1, probs1 = topk_route(logits, spec, bias)
    unbiased = torch.sigmoid(logits) if spec.score_func == "sigmoid" else torch.softmax(logits, -1)
    expect = unbiased.gather(1, ids1)
    if spec.normalize:
        expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(w1, expect * spec.scaling_factor)
    _, _, probs0 = topk_route(logits, spec, None)
    torch.testing.assert_close(probs0, probs1)
    if spec.top_k < spec.num_experts:  # a bias ten times the scores' spread moves some token's choice
        assert not torch.equal(ids0.sort(-1).values, ids1.sort(-1).values)


def test_large_bias_moves_selection():
    spec = RoutingSpec(num_experts=8, top_k=2, score_func="sigmoid", selection_bias=True)
    logits = torch.randn(32, 8)
    bias = torch.zeros(8)
    bias[5] = 100.0
    ids, _, _ = topk_route(logits, spec, bias)
    assert (ids == 5).any(-1).all()


@SETTINGS
@given(
    e=st.integers(1, 12),
    tokens=st.integers(1, 50),
    cf=st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]),
    policy=st.sampled_from(["position", "score"]),
    seed=st.integers(0, 1000),
)
def test_capacity_never_exceeded(e, tokens, cf, policy, seed):
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, e + 1, (1,), generator=g))
    spec = RoutingSpec(num_experts=e, top_k=k, normalize=True)
    # skew the logits so some experts overflow
    logits = torch.randn(tokens, e, generator=g) + torch.linspace(3, 0, e)
    ids, w, probs = topk_route(logits, spec)
    plan = apply_capacity(RoutingPlan.from_topk(ids, w, e, probs_TE=probs), cf, policy)
    cap = expert_capacity(tokens, e, k, cf)
    assert int(plan.tokens_per_expert_E.max()) <= cap
    assert plan.num_dropped + plan.expert_ids_N.numel() == tokens * k
    # nothing is dropped from an expert still under capacity
    full = torch.bincount(ids.reshape(-1), minlength=e)
    torch.testing.assert_close(plan.tokens_per_expert_E, torch.minimum(full, torch.tensor(cap)))


def test_capacity_position_policy_keeps_first_tokens():
    e, tokens = 2, 8
    ids = torch.zeros(tokens, 1, dtype=torch.long)  # everyone wants expert 0
    plan = apply_capacity(RoutingPlan.from_topk(ids, torch.ones(tokens, 1), e), 1.0, "position")
    assert plan.token_ids_N.tolist() == [0, 1, 2, 3]  # capacity = ceil(8/2) = 4
    w = torch.arange(tokens, dtype=torch.float).unsqueeze(1)
    plan = apply_capacity(RoutingPlan.from_topk(ids, w, e), 1.0, "score")
    assert sorted(plan.token_ids_N.tolist()) == [4, 5, 6, 7]


@SETTINGS
@given(e=st.integers(1, 10), tokens=st.integers(1, 60), k=st.integers(1, 4), cf=st.sampled_from([0.5, 1.0, 2.0]))
def test_expert_choice_takes_exactly_c(e, tokens, k, cf):
    k = min(k, e)
    plan = expert_choice_route(torch.randn(tokens, e), k, cf)
    c = expert_choice_capacity(tokens, e, k, cf)
    assert c == min(tokens, math.ceil(k * tokens * cf / e))
    assert plan.tokens_per_expert_E.tolist() == [c] * e
    # an expert takes a token at most once; slots are unique per token
    pairs = set(zip(plan.token_ids_N.tolist(), plan.expert_ids_N.tolist(), strict=True))
    assert len(pairs) == plan.token_ids_N.numel()
    slots = set(zip(plan.token_ids_N.tolist(), plan.slot_N.tolist(), strict=True))
    assert len(slots) == plan.token_ids_N.numel()
    assert (plan.weights_N >= 0).all()


@SETTINGS
@given(b=st.integers(1, 3), t=st.integers(1, 20), e=st.integers(1, 6), spe=st.integers(1, 3))
def test_soft_moe_weights_sum_to_one(b, t, e, spe):
    plan = soft_route(torch.randn(b, t, e * spe) * 4, e)
    torch.testing.assert_close(plan.dispatch_BTS.sum(1), torch.ones(b, e * spe))
    torch.testing.assert_close(plan.combine_BTS.sum(2), torch.ones(b, t))


def test_soft_moe_padding_gets_no_dispatch_weight():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    plan = soft_route(torch.randn(1, 5, 6), 3, mask)
    assert plan.dispatch_BTS[0, :2].abs().max() == 0
    torch.testing.assert_close(plan.dispatch_BTS.sum(1), torch.ones(1, 6))


@SETTINGS
@given(e=st.integers(1, 16), k=st.integers(1, 4), seed=st.integers(0, 100))
def test_hash_routing_distinct_and_deterministic(e, k, seed):
    k = min(k, e)
    ids = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(seed))
    a, b = hash_route(ids, e, k), hash_route(ids, e, k)
    assert torch.equal(a.expert_ids_N, b.expert_ids_N)
    rows = a.expert_ids_N.view(30, k).tolist()
    assert all(len(set(r)) == k for r in rows)
    torch.testing.assert_close(a.weights_N.view(30, k).sum(-1), torch.ones(30))
