"""DeepSeek-V4's MoE parts against transformers' own modules on the same random weights: sqrt-softplus scores with a
selection bias, renormalised and scaled, and the SwiGLU of clamped gate and up in the routed and shared experts
(the modules, and the one-call FFN step)."""

import pytest
import torch

from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.infer.fast import block_step
from moekit.layers.moe import MoEBlock
from moekit.routing.spec import RoutingSpec

transformers = pytest.importorskip("transformers")


def _v4_block(limit: float):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    cfg = transformers.AutoConfig.for_model(
        "deepseek_v4",
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        num_hidden_layers=4,
        swiglu_limit=limit,
        routed_scaling_factor=1.5,
        vocab_size=64,
    )
    torch.manual_seed(0)
    block = DeepseekV4SparseMoeBlock(cfg, layer_idx=3).eval()  # past the hash-routed layers
    with torch.no_grad():
        for p in [*block.parameters(), *block.buffers()]:
            p.normal_(std=0.5)
    return cfg, block


@pytest.mark.parametrize("limit", [10.0, 0.5])  # the published limit, and one that clamps
def test_routed_block_equals_transformers(limit):
    cfg, theirs = _v4_block(limit)
    spec = RoutingSpec(
        num_experts=8,
        top_k=3,
        score_func="sqrtsoftplus",
        selection_bias=True,
        normalize=True,
        normalize_eps=1e-20,
        scaling_factor=1.5,
        router_dtype="model",
    )
    moe = MoEConfig(
        routing=spec,
        expert_hidden=16,
        layout=ExpertLayout(activation="limited_swiglu", swiglu_limit=limit),
        num_shared_experts=1,
    )
    ours = MoEBlock(32, moe).eval()
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.weight)
        ours.router.selection_bias_E.copy_(theirs.gate.e_score_correction_bias)
        ours.experts.gate_up_proj.copy_(theirs.experts.gate_up_proj)
        ours.experts.down_proj.copy_(theirs.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_experts, name).weight.copy_(getattr(theirs.shared_experts, name).weight)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = theirs(x)
        got, _ = ours(x)
        fused, _ = block_step(ours)(x.view(-1, 32))
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    assert float((fused.view_as(ref) - ref).norm() / ref.norm()) < 1e-5


def test_hyper_connection_equals_transformers_and_its_kernel():
    """The hyper-connection weights (pre / post / Sinkhorn comb) and the head's collapse: moekit's modules against
    transformers' on the same parameters, and moekit's one-call kernel against its PyTorch reference."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4HyperConnection,
        DeepseekV4HyperHead,
    )

    from moekit.layers.hyper import HyperConnection, HyperHead

    cfg = transformers.AutoConfig.for_model("deepseek_v4", hidden_size=32, hc_mult=4, num_hidden_layers=4)
    torch.manual_seed(0)
    theirs, head = DeepseekV4HyperConnection(cfg), DeepseekV4HyperHead(cfg)
    ours = HyperConnection(32, 4, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
    our_head = HyperHead(32, 4, cfg.hc_eps, cfg.rms_norm_eps)
    with torch.no_grad():
        for p in [*theirs.parameters(), *head.parameters()]:
            p.normal_(std=0.5)
        ours.fn.copy_(theirs.fn), ours.base.copy_(theirs.base), ours.scale.copy_(theirs.scale)
        our_head.hc_fn.copy_(head.hc_fn), our_head.hc_base.copy_(head.hc_base), our_head.hc_scale.copy_(head.hc_scale)
    x = torch.randn(2, 5, 4, 32)
    with torch.no_grad():
        expected = theirs(x)
        fused = ours(x)  # the kernel
        torch.testing.assert_close(our_head(x), head(x), rtol=1e-5, atol=1e-6)
    reference = ours(x.requires_grad_())  # the PyTorch reference (gradients wanted)
    for got in (fused, reference):
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


def test_hyper_kernels_equal_their_references_at_one_token_and_many():
    """The connection's weights (one token: fn's rows spread over the threads) and the mix after a block: moekit's
    kernels against the PyTorch reference (what runs where gradients are wanted)."""
    from moekit.layers.hyper import HyperConnection

    torch.manual_seed(0)
    hc = HyperConnection(64, 4, 20, 1e-6, 1e-6)
    with torch.no_grad():
        hc.fn.normal_(std=0.5), hc.base.normal_(), hc.scale.normal_()
    for shape in ((1, 1, 4, 64), (2, 3, 4, 64)):
        x, out = torch.randn(shape), torch.randn(*shape[:2], 64)
        with torch.no_grad():
            post, comb, collapsed = hc(x)
            mixed = HyperConnection.mix(x, out, post, comb)
        with torch.enable_grad():
            expected = hc(x.clone().requires_grad_())
            expected_mix = HyperConnection.mix(x.clone().requires_grad_(), out, *expected[:2])
        for a, b in zip((post, comb, collapsed, mixed), (*expected, expected_mix), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)  # values of order 1
