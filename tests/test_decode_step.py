"""The one-call decode steps (moekit/layers/decode_step.py and the C++ behind them) compute what the modules they
stand in for compute: per family against transformers' greedy decoding and against moekit's own modules step by
step, and on the routing and expert variants no tiny published config switches on."""

import sys
from pathlib import Path

import pytest
import torch

import moekit
import moekit.model.decoder as decoder
from moekit.config.moe import MoEConfig
from moekit.experts import gemv
from moekit.experts.layout import ExpertLayout
from moekit.infer.cache import KVCache
from moekit.layers.decode_step import moe_step
from moekit.layers.moe import MoEBlock
from moekit.layers.norm import RMSNorm
from moekit.routing.spec import RoutingSpec

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import FAMILIES, hf_tiny_model  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not gemv.kernel_available(), reason="no C++ compiler: the modules run instead")

# Which blocks take the one-call path in each tiny config (the others' variants are left to the modules: MLA,
# sinks, chunked or NoPE-with-temperature attention, LayerNorm, clip_qkv; group-limited routing, SparseMixer,
# transposed experts).
FUSED = {
    "mixtral": {"attention", "moe"},
    "qwen2_moe": {"attention", "moe"},
    "qwen3_moe": {"attention", "moe"},
    "olmoe": {"moe"},
    "glm4_moe": {"attention"},
}
CASES = [(f, {}) for f in FAMILIES] + [
    ("olmoe", {"clip_qkv": None}),  # QK-norm over the full projections
    ("deepseek_v3", {"n_group": 1, "topk_group": 1}),  # sigmoid, selection bias, renormalisation eps, scaling
    ("glm4_moe", {"n_group": 1, "topk_group": 1}),  # ... with partial rotary, QK-norm and qkv bias attention
]
FUSED_OVERRIDDEN = {"olmoe": {"attention", "moe"}, "deepseek_v3": {"moe"}, "glm4_moe": {"attention", "moe"}}


def _spy(monkeypatch) -> dict[str, int]:
    """Count the steps each one-call path actually took."""
    taken = {"attention": 0, "moe": 0}
    attention_step, moe_step_ = decoder.attention_step, decoder.moe_step

    def counted(kind, fn):
        def wrapper(*args):
            out = fn(*args)
            taken[kind] += out is not None
            return out

        return wrapper

    monkeypatch.setattr(decoder, "attention_step", counted("attention", attention_step))
    monkeypatch.setattr(decoder, "moe_step", counted("moe", moe_step_))
    return taken


def _decode_logits(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    cache, out = KVCache(), []
    with torch.no_grad():
        logits = model(prompt, cache=cache, logits_to_keep=1)
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), cache=cache)
            out.append(logits[:, -1])
    return torch.cat(out)


@pytest.mark.parametrize("family,overrides", CASES, ids=[f + ("+" * bool(o)) for f, o in CASES])
def test_decode_steps_equal_the_modules_and_transformers(family, overrides, tmp_path, monkeypatch):
    hf = hf_tiny_model(family, tmp_path, **overrides)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    monkeypatch.setattr(gemv, "MIN_KERNEL_BYTES", 0)  # tiny weights: take the kernels anyway
    taken = _spy(monkeypatch)
    prompt = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, 12).tolist() == expected.tolist()
    fused = _decode_logits(model, prompt, 10)
    expected_paths = (FUSED_OVERRIDDEN if overrides else FUSED).get(family, set())
    assert {kind for kind, n in taken.items() if n} == expected_paths
    monkeypatch.setattr(decoder, "attention_step", lambda *args: None)
    monkeypatch.setattr(decoder, "moe_step", lambda *args: None)
    reference = _decode_logits(model, prompt, 10)
    assert float((fused - reference).norm() / reference.norm()) < 1e-5


VARIANTS = {
    # GPT-OSS's math with experts stored [E, out, in]: bias in the router, top-k on logits then softmax over the k,
    # interleaved clamped SwiGLU with biases
    "gpt_oss": MoEConfig(
        routing=RoutingSpec(num_experts=8, top_k=4, softmax_after_topk=True),
        expert_hidden=24,
        router_bias=True,
        layout=ExpertLayout(gate_up="interleaved", bias=True, activation="clamped_swiglu", swiglu_limit=0.5),
    ),
    # ungated GELU experts and an ungated shared expert
    "gelu_mlp": MoEConfig(
        routing=RoutingSpec(num_experts=6, top_k=2),
        expert_hidden=20,
        layout=ExpertLayout(gated=False, activation="gelu"),
        num_shared_experts=1,
    ),
    # gated tanh-GELU, a sigmoid-gated shared expert
    "gelu_tanh_shared": MoEConfig(
        routing=RoutingSpec(num_experts=8, top_k=3, normalize=True),
        expert_hidden=16,
        layout=ExpertLayout(activation="gelu_tanh"),
        num_shared_experts=2,
        shared_gate=True,
    ),
    # sigmoid scores with a selection bias, eps and scaling; weights on the expert input (Llama 4); ReGLU
    "sigmoid_input": MoEConfig(
        routing=RoutingSpec(
            num_experts=8,
            top_k=2,
            score_func="sigmoid",
            selection_bias=True,
            normalize=True,
            normalize_eps=0.1,
            scaling_factor=2.5,
            apply_to="input",
        ),
        expert_hidden=16,
        layout=ExpertLayout(activation="relu"),
    ),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_moe_step_covers_routing_and_expert_variants(name, monkeypatch):
    monkeypatch.setattr(gemv, "MIN_KERNEL_BYTES", 0)
    torch.manual_seed(0)
    block, norm = MoEBlock(32, VARIANTS[name]).eval(), RMSNorm(32)
    with torch.no_grad():
        for p in [*block.parameters(), *block.buffers(), norm.weight]:
            p.normal_(std=0.5)
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        y, info = moe_step(norm, block, x)
        ref, ref_info = block(norm(x))
    torch.testing.assert_close(y, x + ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(info.tokens_per_expert_E, ref_info.tokens_per_expert_E)
    assert sorted(info.topk_ids_TK.tolist()[0]) == sorted(ref_info.topk_ids_TK.tolist()[0])
    with torch.no_grad(), pytest.raises(ValueError, match="router input contains NaN"):
        moe_step(norm, block, torch.full_like(x, float("nan")))


def test_moe_step_declines_training_and_other_backends(monkeypatch):
    monkeypatch.setattr(gemv, "MIN_KERNEL_BYTES", 0)
    block, norm = MoEBlock(32, VARIANTS["gelu_mlp"]), RMSNorm(32)
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        assert moe_step(norm, block.train(), x) is None  # training: jitter, load counts
        block.eval().set_backend("loop")  # a chosen reference backend is honoured
        assert moe_step(norm, block, x) is None
        block.set_backend("auto")
        assert moe_step(norm, block, torch.randn(1, 2, 32)) is None  # not one token
    assert moe_step(norm, block, x) is None  # gradients wanted
