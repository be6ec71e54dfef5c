"""Every backend against the per-expert loop, and the whole block against a per-token reference."""

import pytest
import torch

from moekit import ExpertLayout, MoEBlock, MoEConfig, RoutingSpec
from moekit.experts import ExpertWeights, get_backend, segment_mm
from moekit.experts.backends import MATMULS

LAYOUTS = {
    "swiglu": ExpertLayout(),
    "gpt-oss": ExpertLayout(gate_up="interleaved", transposed=True, bias=True, activation="clamped_swiglu"),
    "geglu-bias": ExpertLayout(activation="gelu_tanh", bias=True),
    "relu-mlp": ExpertLayout(gated=False, activation="relu"),
}


def _routings(tokens: int, e: int, k: int) -> dict[str, torch.Tensor]:
    """Adversarial routings: expert ids [T, K]."""
    g = torch.Generator().manual_seed(1)
    rand = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    one = (torch.arange(k).repeat(tokens, 1)) % e  # everything on the first k experts
    return {"random": rand, "all-on-few": one, "skip-experts": rand % max(1, e // 2) if k == 1 else rand}


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


def _block(layout, e, k, f=24, d=32):
    spec = RoutingSpec(num_experts=e, top_k=k, normalize=True)
    blk = MoEBlock(d, MoEConfig(routing=spec, expert_hidden=f, layout=layout, backend="loop"))
    torch.nn.init.normal_(blk.experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(blk.experts.down_proj, std=0.3)
    if layout.bias:
        torch.nn.init.normal_(blk.experts.gate_up_proj_bias, std=0.3)
        torch.nn.init.normal_(blk.experts.down_proj_bias, std=0.3)
    torch.nn.init.normal_(blk.router.weight, std=1.0)
    return blk


GROUPED = [f"grouped:{m}" for m in MATMULS]  # the grouped backend with each matmul
EVERY = ["loop", *GROUPED]


def _backend(label: str):
    name, _, matmul = label.partition(":")
    return get_backend(name, matmul or "auto")


@pytest.mark.parametrize("backend", GROUPED)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("tokens,e,k", [(1, 4, 2), (13, 8, 2), (40, 8, 8), (64, 16, 1), (7, 3, 3)])
def test_backend_matches_loop(backend, layout_name, tokens, e, k):
    layout = LAYOUTS[layout_name]
    d, f = 32, 24
    experts = ExpertWeights(e, d, f, layout)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.3)
    for name, ids in _routings(tokens, e, k).items():
        counts = torch.bincount(ids.reshape(-1), minlength=e).tolist()
        x = torch.randn(sum(counts), d, requires_grad=True)
        fast_backend, loop = _backend(backend), get_backend("loop")
        if fast_backend.unsupported(experts, x):
            pytest.skip(fast_backend.unsupported(experts, x))
        dy = torch.randn(sum(counts), d)
        y_ref = loop(x, counts, experts)
        grads_ref = torch.autograd.grad(y_ref, [x, *experts.parameters()], dy)
        y = fast_backend(x, counts, experts)
        grads = torch.autograd.grad(y, [x, *experts.parameters()], dy)
        assert _rel(y, y_ref) < 1e-5, name
        for gr, gf in zip(grads_ref, grads, strict=True):
            assert _rel(gf, gr) < 1e-5, name


def test_backend_handles_no_rows():
    experts = ExpertWeights(4, 16, 8, ExpertLayout())
    x = torch.randn(0, 16)
    for name in ("loop", "grouped"):
        assert get_backend(name)(x, [0, 0, 0, 0], experts).shape == (0, 16)


def test_segment_mm_splits_long_segments_deterministically():
    torch.manual_seed(0)
    w = torch.randn(3, 40, 24, requires_grad=True)
    counts = [500, 0, 7]
    x = torch.randn(507, 24, requires_grad=True)
    y = segment_mm(x, w, counts)
    ref = torch.cat([x[:500] @ w[0].t(), x[500:] @ w[2].t()])
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, [x, w], dy)
    gx2, gw2 = torch.autograd.grad(segment_mm(x, w, counts), [x, w], dy)
    assert torch.equal(gx, gx2) and torch.equal(gw, gw2)  # bitwise repeatable
    assert gw[1].abs().max() == 0


def _per_token_reference(blk: MoEBlock, x_TD: torch.Tensor) -> torch.Tensor:
    """Each token, each of its experts, one at a time: no sorting, no dispatcher."""
    plan = blk.router(x_TD)
    loop = get_backend("loop")
    y = torch.zeros_like(x_TD)
    for n in range(plan.token_ids_N.numel()):
        t, e, w = int(plan.token_ids_N[n]), int(plan.expert_ids_N[n]), plan.weights_N[n]
        counts = [0] * blk.cfg.num_experts
        counts[e] = 1
        inp = x_TD[t : t + 1] * (w if plan.apply_to == "input" else 1)
        out = loop(inp, counts, blk.experts)[0]
        y[t] += out * (w if plan.apply_to == "output" else 1)
    return y


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("apply_to", ["output", "input"])
def test_block_matches_per_token_reference(backend, apply_to):
    blk = _block(ExpertLayout(), 8, 2)
    blk.router.spec = RoutingSpec(num_experts=8, top_k=2, normalize=True, apply_to=apply_to)
    x = torch.randn(2, 9, 32)
    name, _, matmul = backend.partition(":")
    blk.set_backend(name, matmul or "auto")
    if blk.backend.unsupported(blk.experts, x):
        pytest.skip("unsupported here")
    y, _ = blk(x)
    ref = _per_token_reference(blk, x.reshape(-1, 32)).view(2, 9, 32)
    assert _rel(y, ref) < 1e-5


def test_block_with_drops_matches_reference_and_backward():
    spec = RoutingSpec(num_experts=4, top_k=2)
    cfg = MoEConfig(routing=spec, expert_hidden=16, capacity_factor=0.5, num_shared_experts=1, shared_gate=True)
    blk = MoEBlock(32, cfg)
    x = torch.randn(1, 20, 32, requires_grad=True)
    y, info = blk(x)
    assert info.dropped > 0 and info.assignments == 40
    blk.set_backend("loop")
    y2, _ = blk(x)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert blk.router.weight.grad.abs().sum() > 0  # the gate weights carry gradient to the router
    assert blk.shared_expert_gate.weight.grad is not None


def test_unknown_backend_or_matmul_is_refused():
    with pytest.raises(ValueError, match="backend"):
        get_backend("cuda-magic")
    with pytest.raises(ValueError, match="only grouped has one"):
        get_backend("loop", "segment")
    with pytest.raises(ValueError, match="matmul='fast' is invalid"):
        get_backend("grouped", "fast")
    with pytest.raises(ValueError, match="only the grouped backend has one"):
        MoEConfig(routing=RoutingSpec(num_experts=4, top_k=1), expert_hidden=8, backend="loop", matmul="segment")


def test_torch_grouped_mm_refuses_unaligned():
    experts = ExpertWeights(2, 6, 3, ExpertLayout())
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="grouped, matmul=torch_grouped_mm"):
        get_backend("grouped", "torch_grouped_mm")(x, [2, 2], experts)


def test_tied_router_logits_route_and_match():
    blk = _block(ExpertLayout(), 6, 3)
    with torch.no_grad():
        blk.router.weight.zero_()  # every expert ties for every token
    x = torch.randn(1, 5, 32)
    y, info = blk(x)
    blk.set_backend("grouped")
    y2, _ = blk(x)
    assert _rel(y2, y) < 1e-5
    assert int((info.tokens_per_expert_E > 0).sum()) == 3  # ties resolve to the same experts every time


@pytest.mark.parametrize("layout_name", ["swiglu", "geglu-bias", "relu-mlp"])
@pytest.mark.parametrize("apply_to", ["output", "input"])
@pytest.mark.parametrize("d,f", [(32, 24), (512, 1024)])  # torch.mv fallback; 4 MB per expert: the C++ kernel
def test_one_token_decode_path_matches_loop(layout_name, apply_to, d, f):
    """At batch 1 under no_grad the grouped backend skips dispatch (its one_token path): it must equal the loop."""
    torch.manual_seed(0)
    blk = _block(LAYOUTS[layout_name], 4, 2, f=f, d=d)
    blk.router.spec = RoutingSpec(num_experts=4, top_k=2, normalize=True, apply_to=apply_to)
    x = torch.randn(1, 1, d)
    with torch.no_grad():
        ref, _ = blk(x)
        blk.set_backend("grouped")
        plan = blk.router(x.view(1, d))
        direct = blk.backend.one_token(x.view(1, d), plan.expert_ids_N, plan.weights_N, blk.experts, apply_to)
        y, info = blk(x)
    assert direct is not None and torch.equal(direct.view(1, 1, d), y)
    assert _rel(y, ref) < 1e-5
    assert int(info.tokens_per_expert_E.sum()) == 2
