"""Balancing losses, the loss-free bias and routing metrics."""

import math

import pytest
import torch

from moekit import MoEBlock, MoEConfig, RoutingSpec
from moekit.routing import (
    LossFreeBalancer,
    load_cv,
    load_entropy,
    loss_free_bias_update,
    max_vio,
    router_z_loss,
    routing_stats,
    sequence_aux_loss,
    switch_aux_loss,
    topk_route,
)
from moekit.routing.metrics import dead_experts


def test_metrics_hand_cases():
    assert max_vio([4, 4, 4, 4]) == 0.0
    assert load_entropy([4, 4, 4, 4]) == pytest.approx(1.0)
    assert max_vio([16, 0, 0, 0]) == pytest.approx(3.0)
    assert load_entropy([16, 0, 0, 0]) == pytest.approx(0.0)
    assert load_cv([4, 4, 4, 4]) == 0.0
    assert load_cv([16, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert dead_experts([16, 0, 0, 0]) == 3
    s = routing_stats([6, 2, 0, 0], dropped=2)
    assert s["dropped_fraction"] == pytest.approx(0.2) and s["dead_experts"] == 2


@pytest.mark.parametrize("k", [1, 2, 4])
def test_aux_loss_is_alpha_at_uniform_routing(k):
    e, t, alpha = 8, 64, 0.01
    probs = torch.full((t, e), 1.0 / e, requires_grad=True)
    ids = (torch.arange(t * k) % e).view(t, k)  # every expert gets exactly t*k/e
    assert switch_aux_loss(probs, ids, alpha).item() == pytest.approx(alpha, rel=1e-6)
    assert sequence_aux_loss(probs.view(4, 16, e), ids.view(4, 16, k), alpha).item() == pytest.approx(alpha, rel=1e-6)


def test_aux_loss_gradient_flows_through_p_only_and_is_proportional_to_f():
    e, t = 4, 32
    logits = torch.randn(t, e, requires_grad=True)
    probs = logits.softmax(-1)
    ids = torch.zeros(t, 1, dtype=torch.long)  # all on expert 0: f = [1, 0, 0, 0]
    loss = switch_aux_loss(probs, ids, 1.0)
    (g,) = torch.autograd.grad(loss, probs)
    torch.testing.assert_close(g, torch.tensor([e / t, 0, 0, 0]).expand(t, e))
    assert loss.item() == pytest.approx(e * probs[:, 0].mean().item(), rel=1e-5)


def test_aux_loss_ignores_padding():
    probs = torch.full((4, 2), 0.5)
    ids = torch.tensor([[0], [1], [0], [0]])
    mask = torch.tensor([1, 1, 0, 0])
    assert switch_aux_loss(probs, ids, 1.0, mask).item() == pytest.approx(1.0)


def test_sequence_loss_sees_per_sequence_imbalance_that_the_batch_loss_misses():
    e = 2
    probs = torch.tensor([[[0.9, 0.1]] * 4, [[0.1, 0.9]] * 4])
    ids = torch.tensor([[[0]] * 4, [[1]] * 4])
    batch = switch_aux_loss(probs.view(-1, e), ids.view(-1, 1), 1.0)
    seq = sequence_aux_loss(probs, ids, 1.0)
    assert batch.item() == pytest.approx(1.0)
    assert seq.item() == pytest.approx(2 * 0.9)


def test_z_loss():
    logits = torch.zeros(3, 4)
    assert router_z_loss(logits, 1.0).item() == pytest.approx(math.log(4) ** 2)
    assert router_z_loss(torch.full((2, 2), -math.log(2)), 1.0).item() == pytest.approx(0.0, abs=1e-12)


def _simulate(rate: float, steps: int, e=16, k=2, tokens=4096):
    """A fixed batch from a strongly skewed sigmoid router (expert 0 preferred by every token, expert 15 by none),
    re-routed after every bias update."""
    spec = RoutingSpec(num_experts=e, top_k=k, score_func="sigmoid", selection_bias=True)
    logits = torch.randn(tokens, e, generator=torch.Generator().manual_seed(0)) + torch.linspace(2.0, -2.0, e)
    bias = torch.zeros(e)
    history = []
    for _ in range(steps):
        ids, _, _ = topk_route(logits, spec, bias)
        load = torch.bincount(ids.reshape(-1), minlength=e)
        history.append(max_vio(load))
        loss_free_bias_update(bias, load, rate)
    return history


def test_loss_free_bias_balances_a_skewed_router():
    history = _simulate(rate=1e-3, steps=400)
    assert history[0] > 3.0
    first_balanced = next(i for i, v in enumerate(history) if v < 0.1)
    assert first_balanced < 350
    assert max(history[first_balanced:]) < 0.1  # and it stays balanced


def test_too_large_bias_rate_oscillates():
    history = _simulate(rate=1e-1, steps=400)
    tail = history[-100:]
    assert min(tail) > 0.5  # never balances
    assert max(tail) - min(tail) > 0.5  # swings from step to step: the bias overshoots


def test_loss_free_balancer_accumulates_over_micro_batches():
    spec = RoutingSpec(num_experts=4, top_k=1, score_func="sigmoid", selection_bias=True)
    blk = MoEBlock(8, MoEConfig(routing=spec, expert_hidden=8, bias_update_rate=0.1))
    blk.train()
    balancer = LossFreeBalancer([blk.router], rate=0.1)
    x1, x2 = torch.randn(1, 10, 8), torch.randn(1, 6, 8)
    _, i1 = blk(x1)
    _, i2 = blk(x2)
    total = (i1.tokens_per_expert_E + i2.tokens_per_expert_E).float()
    torch.testing.assert_close(blk.router.load_E, total)
    balancer.step()
    torch.testing.assert_close(blk.router.selection_bias_E, 0.1 * torch.sign(total.mean() - total))
    assert blk.router.load_E.sum() == 0
    assert "router.selection_bias_E" in blk.state_dict() and "router.load_E" not in blk.state_dict()
    assert all("selection_bias" not in n for n, _ in blk.named_parameters())


def test_eval_mode_does_not_count_load():
    spec = RoutingSpec(num_experts=4, top_k=1, score_func="sigmoid", selection_bias=True)
    blk = MoEBlock(8, MoEConfig(routing=spec, expert_hidden=8)).eval()
    blk(torch.randn(1, 5, 8))
    assert blk.router.load_E.sum() == 0


def test_block_losses_add_up():
    spec = RoutingSpec(num_experts=4, top_k=2)
    cfg = MoEConfig(routing=spec, expert_hidden=8, aux_loss_coef=0.01, seq_aux_loss_coef=0.001, z_loss_coef=0.001)
    blk = MoEBlock(8, cfg)
    x = torch.randn(2, 5, 8)
    _, info = blk(x)
    plan = blk.router(x.view(-1, 8))
    expect = (
        switch_aux_loss(plan.probs_TE, plan.topk_ids_TK, 0.01)
        + sequence_aux_loss(plan.probs_TE.view(2, 5, 4), plan.topk_ids_TK.view(2, 5, 2), 0.001)
        + router_z_loss(plan.logits_TE, 0.001)
    )
    assert info.aux_loss.item() == pytest.approx(expect.item(), rel=1e-6)


def test_load_metrics_count_what_the_router_asked_before_capacity_drops():
    spec = RoutingSpec(num_experts=4, top_k=1)
    blk = MoEBlock(8, MoEConfig(routing=spec, expert_hidden=8, capacity_factor=1.0))
    with torch.no_grad():
        blk.router.weight.zero_()
        blk.router.weight[0, 0], blk.router.weight[1, 0] = 10.0, -10.0  # sign of feature 0 picks expert 0 or 1
    x = torch.randn(1, 16, 8)
    x[..., 0] = x[..., 0].abs() + 0.1
    x[0, 10:, 0] *= -1  # 10 tokens ask for expert 0, 6 for expert 1
    _, info = blk(x)
    assert info.tokens_per_expert_E.tolist() == [4, 4, 0, 0]  # capacity 16 / 4 = 4
    assert info.requested_per_expert_E.tolist() == [10, 6, 0, 0] and info.dropped == 8
    from moekit.train.telemetry import LoadAccumulator

    loads = LoadAccumulator()
    loads.add({1: info})
    assert loads.max_vio() == 1.5  # 10 / 4 - 1; the capped counts would say 1.0
