"""The fused inference steps (moekit/infer/fast.py and the C++ behind them: a whole model's decode step, or one
block's) compute what the modules they stand in for compute: per family against transformers' greedy decoding and
against moekit's own modules (the model with no steps installed) step by step, and on the routing and expert
variants no tiny published config switches on."""

import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit import kernels
from moekit.config.attention import RopeScaling
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.families import FAMILIES as REGISTRY
from moekit.infer import fast
from moekit.infer.cache import KVCache
from moekit.infer.fast import block_step, ffn_step, prepare_block, prepare_inference
from moekit.layers.moe import MoEBlock
from moekit.layers.norm import RMSNorm
from moekit.layers.rope import RotaryEmbedding
from moekit.routing.spec import RoutingSpec

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import FAMILIES, hf_tiny_model  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="no C++ compiler: the modules run instead")

# Which one-call paths each tiny config takes: the whole step ("chain") where every block is covered, else the
# covered blocks one by one (the others' variants are left to the modules: MLA, chunked or NoPE-with-temperature
# attention, LayerNorm; group-limited routing, SparseMixer). "ffn" covers MoE blocks and dense FFN layers.
FUSED = {
    "mixtral": {"chain"},
    "qwen2_moe": {"chain"},  # sparse and dense layers, a sigmoid-gated shared expert, qkv bias
    "qwen3_moe": {"chain"},
    "olmoe": {"chain"},
    "glm4_moe": {"chain"},  # group-limited routing, a dense first layer
    "gpt_oss": {"chain"},  # sinks, sliding/full layers, yarn; transposed interleaved experts
    "llama4_text": {"ffn"},  # sigmoid top-1 on the expert input, a shared expert, transposed experts
    "deepseek_v2": {"chain"},  # MLA without q-LoRA, group-limited greedy, a dense first layer
    "deepseek_v3": {"chain"},  # MLA with q-LoRA, top-2-sum groups
    "deepseek_v32": {"chain"},  # DeepSeek Sparse Attention: the indexer picks past index_topk keys
    "glm_moe_dsa": {"attention", "ffn"},  # a layer sharing its predecessor's pick (both: the modules)
    "mistral4": {"chain"},  # MLA with position-scaled queries, softmax in top-2-sum groups
    "mimo_v2_flash": {"ffn"},  # narrow scaled values, sinks on sliding layers, two rope thetas: the modules
    "deepseek_v4": {"chain"},  # hyper-connections, compressed attention (CSA's pick, HCA, windows), token table
    "minimax_m2": {"chain"},  # full-projection QK-norm with partial rotary, sigmoid with selection bias
    "dots1": {"chain"},  # per-head QK-norm, sliding layers, shared expert, dense first layer
    "ernie4_5_moe": {"ffn"},  # rope on interleaved pairs (the GQA attention step rotates split halves)
    "hunyuan_v1_moe": {"ffn"},  # QK-norm after rope (the attention step norms before it), a top-k per layer
    "jamba": {"attention", "ffn"},  # Mamba layers run the modules (no whole-step chain); attention has no rope
    "granitemoe": set(),  # muP's residual multiplier: the layer steps add unscaled residuals, the modules run
    "granitemoeshared": set(),
}
CASES = [(f, {}) for f in FAMILIES] + [
    ("deepseek_v3", {"n_group": 1, "topk_group": 1}),  # sigmoid, selection bias, renormalisation eps, scaling
    ("glm4_moe", {"n_group": 1, "topk_group": 1}),  # ... with partial rotary, QK-norm and qkv bias attention
    ("deepseek_v2", {"attention_bias": True, "rope_interleave": False}),  # MLA's biases, split-half rope
    ("glm_moe_dsa", {"indexer_types": ["full"] * 4}),  # every layer its own indexer (interleaved rope)
]
FUSED_OVERRIDDEN = {"deepseek_v3": {"chain"}, "glm4_moe": {"chain"}, "deepseek_v2": {"chain"}, "glm_moe_dsa": {"chain"}}


def _spy(monkeypatch) -> dict[str, int]:
    """Count the steps each fused path actually took."""
    taken = {"chain": 0, "attention": 0, "ffn": 0}
    steps = (("chain", fast._ChainStep), ("attention", fast._AttentionStep), ("ffn", fast._FfnStep))
    for kind, cls in (*steps, ("attention", fast._CompressedStep)):

        def counted(self, *args, _call=cls.__call__, _kind=kind):
            out = _call(self, *args)
            taken[_kind] += out is not None
            return out

        monkeypatch.setattr(cls, "__call__", counted)
    return taken


def _without_chain(model) -> None:
    model.__dict__.pop("fused", None)  # the layers' steps stay


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
    taken = _spy(monkeypatch)
    prompt = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, 12).tolist() == expected.tolist()  # generate prepares the model
    fused = _decode_logits(model, prompt, 10)
    expected_paths = (FUSED_OVERRIDDEN if overrides else FUSED).get(family, set())
    assert {kind for kind, n in taken.items() if n} == expected_paths
    block_steps = None
    if "chain" in expected_paths:  # the same model block by block
        _without_chain(model)
        taken.update(attention=0, ffn=0)
        block_steps = _decode_logits(model, prompt, 10)
        assert taken["attention"] and taken["ffn"]
    model.drop_fused()  # the pure modules
    reference = _decode_logits(model, prompt, 10)
    assert _rel(fused, reference) < 1e-5
    assert block_steps is None or _rel(block_steps, reference) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_declares_what_the_fused_steps_cover(family, tmp_path):
    hf_tiny_model(family, tmp_path)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    report = prepare_inference(model)
    moe_layers = set(model.moe_blocks())
    covered = {step for step in ("attention", "moe") if moe_layers & set(report[step])}
    assert covered == REGISTRY[family].fused_steps
    model.drop_fused()
    assert all(m.__dict__.get("fused") is None for m in model.modules())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_attention_step_where_clip_and_sinks_bind(family, tmp_path, monkeypatch):
    """Tiny random weights never reach OLMoE's clip_qkv and leave GPT-OSS's sinks near zero: scale them up until
    they change the logits, then the one-call step must still equal the modules."""
    hf_tiny_model(family, tmp_path)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    attns = [layer.self_attn for layer in model.layers]
    with torch.no_grad():
        for attn in attns:
            if family == "olmoe":
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                    lin.weight.mul_(300.0)
            else:
                attn.sinks.normal_(std=2.0)
    taken = _spy(monkeypatch)
    prompt = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    prepare_inference(model)
    fused = _decode_logits(model, prompt, 8)
    _without_chain(model)
    block_steps = _decode_logits(model, prompt, 8)
    assert taken["chain"] and taken["attention"]
    model.drop_fused()
    reference = _decode_logits(model, prompt, 8)
    assert _rel(fused, reference) < 1e-5 and _rel(block_steps, reference) < 1e-5
    for attn in attns:  # without the variant the logits are another model's: it binds
        attn.clip_qkv, attn.sinks = None, None
    assert _rel(_decode_logits(model, prompt, 8), reference) > 1e-2


VARIANTS = {
    # GPT-OSS: bias in the router, top-k on logits then softmax over the k, interleaved clamped SwiGLU with biases,
    # experts stored [E, in, out]
    "gpt_oss": MoEConfig(
        routing=RoutingSpec(num_experts=8, top_k=4, softmax_after_topk=True),
        expert_hidden=24,
        router_bias=True,
        layout=ExpertLayout(
            gate_up="interleaved", bias=True, activation="clamped_swiglu", swiglu_limit=0.5, transposed=True
        ),
    ),
    # the same math with experts stored [E, out, in]
    "gpt_oss_math": MoEConfig(
        routing=RoutingSpec(num_experts=8, top_k=4, softmax_after_topk=True),
        expert_hidden=24,
        router_bias=True,
        layout=ExpertLayout(gate_up="interleaved", bias=True, activation="clamped_swiglu", swiglu_limit=0.5),
    ),
    # Llama 4: sigmoid top-1 on the expert input, a shared expert, transposed experts (width not a multiple of 8)
    "llama4": MoEConfig(
        routing=RoutingSpec(num_experts=4, top_k=1, score_func="sigmoid", normalize=False, apply_to="input"),
        expert_hidden=21,
        layout=ExpertLayout(transposed=True),
        num_shared_experts=1,
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
    # DeepSeek-V3's groups: sigmoid + selection bias, the best 2 of 4 groups by their top-2 sums, a shared expert
    "groups_top2": MoEConfig(
        routing=RoutingSpec(
            num_experts=16,
            top_k=4,
            score_func="sigmoid",
            selection_bias=True,
            n_group=4,
            topk_group=2,
            group_score="top2_sum",
            normalize=True,
            scaling_factor=2.5,
        ),
        expert_hidden=16,
        num_shared_experts=1,
    ),
    # DeepSeek-V4's routed experts: sqrt-softplus scores with a selection bias, SwiGLU of clamped gate and up
    "deepseek_v4": MoEConfig(
        routing=RoutingSpec(
            num_experts=8, top_k=3, score_func="sqrtsoftplus", selection_bias=True, normalize=True, scaling_factor=1.5
        ),
        expert_hidden=16,
        layout=ExpertLayout(activation="limited_swiglu", swiglu_limit=0.4),
        num_shared_experts=1,
    ),
    # DeepSeek-V2's groups: softmax, top-4 within the best 3 of 8 groups by their best expert
    "groups_max": MoEConfig(
        routing=RoutingSpec(num_experts=16, top_k=4, n_group=8, topk_group=3, group_score="max"),
        expert_hidden=16,
    ),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_ffn_step_covers_routing_and_expert_variants(name):
    torch.manual_seed(0)
    block, norm = MoEBlock(32, VARIANTS[name]).eval(), RMSNorm(32)
    with torch.no_grad():
        for p in [*block.parameters(), *block.buffers(), norm.weight]:
            p.normal_(std=0.5)
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        ref, ref_info = block.set_backend("loop") or block(norm(x))  # the modules
        block.set_backend("auto")
        y, info = ffn_step(norm, block)(x)  # norm, block and residual in one call
        alone, alone_info = block_step(block)(norm(x))  # the block alone in one call
        assert prepare_block(block)
        called, _ = block(norm(x))  # what the block's forward takes at one token
    torch.testing.assert_close(y, x + ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(called, alone)
    for got in (info, alone_info):
        assert torch.equal(got.tokens_per_expert_E, ref_info.tokens_per_expert_E)
        assert sorted(got.topk_ids_TK.tolist()[0]) == sorted(ref_info.topk_ids_TK.tolist()[0])
    with torch.no_grad(), pytest.raises(ValueError, match="router input contains NaN"):
        ffn_step(norm, block)(torch.full_like(x, float("nan")))


@pytest.mark.parametrize("name", VARIANTS)
def test_block_over_many_tokens_in_one_call(name):
    """Inference over a batch of tokens runs the block as one kernel call (segments per expert, ffn_tokens.cpp):
    the modules' output and routing, with short segments in moekit's kernel and long ones (over 192 rows) in MKL."""
    torch.manual_seed(0)
    block = MoEBlock(32, VARIANTS[name]).eval()
    with torch.no_grad():
        for p in [*block.parameters(), *block.buffers()]:
            p.normal_(std=0.5)
    step = block_step(block)
    for shape in [(1, 5), (2, 3), (1, 1000)]:
        x = torch.randn(*shape, 32)
        with torch.no_grad():
            ref, ref_info = block.set_backend("loop") or block(x)  # the modules
            block.set_backend("auto")
            prepare_block(block)
            fused = step(x)
            y, info = block(x)
        assert fused is not None and torch.equal(fused[0], y)  # the forward took the one call
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(info.tokens_per_expert_E, ref_info.tokens_per_expert_E)
        assert info.topk_ids_TK.sort(-1).values.equal(ref_info.topk_ids_TK.sort(-1).values)
        assert (info.assignments, info.dropped) == (ref_info.assignments, 0)
    assert max(ref_info.tokens_per_expert_E) > 192  # a long segment was among them
    with torch.no_grad(), pytest.raises(ValueError, match="router input contains NaN"):
        block(torch.full((1, 4, 32), float("nan")))
    assert step(x) is None  # gradients wanted: the modules


def test_ffn_step_declines_training_and_other_backends():
    block, norm = MoEBlock(32, VARIANTS["gelu_mlp"]), RMSNorm(32)
    x, step = torch.randn(1, 1, 32), ffn_step(norm, block)
    with torch.no_grad():
        assert step(x) is None  # training (a new module): jitter, load counts
        block.eval().set_backend("loop")  # a chosen reference backend is honoured
        assert step(x) is None
        block.set_backend("auto")
        assert step(torch.randn(1, 2, 32)) is None  # not one token
        assert step(x) is not None
    assert step(x) is None  # gradients wanted


def test_steps_cover_what_the_live_modules_say():
    """Coverage is read from the modules as they are, not from the config they were built with: a router whose spec
    now normalises by another p-norm is left to the modules."""
    from dataclasses import replace

    block = MoEBlock(32, VARIANTS["gelu_mlp"]).eval()
    assert block_step(block) is not None
    block.router.spec = replace(block.router.spec, normalize=True, normalize_p=2.0)
    assert block_step(block) is None


def test_replaced_weights_reach_the_next_generation(tmp_path):
    """The steps hold the weights they were built from: a parameter or module put in place of another (a fine-tune
    loaded by assignment, a swapped expert stack) must be what the next generate reads (it prepares the model
    again); dtype changes and state-dict loads drop the steps by themselves."""
    hf_tiny_model("qwen2_moe", tmp_path)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    prompt = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    model.generate(prompt, 2)  # steps installed
    layer = model.layers[min(model.moe_blocks())]
    with torch.no_grad():
        layer.self_attn.o_proj.weight = torch.nn.Parameter(torch.randn_like(layer.self_attn.o_proj.weight))
        layer.mlp.experts.gate_up_proj = torch.nn.Parameter(torch.randn_like(layer.mlp.experts.gate_up_proj))
        norm = RMSNorm(layer.post_attention_layernorm.weight.numel(), eps=0.1)
        norm.weight.uniform_(0.5, 2.0)
        layer.post_attention_layernorm = norm
    model.generate(prompt, 2)  # prepares the model again
    fused_logits = _decode_logits(model, prompt, 4)
    model.drop_fused()
    assert _rel(fused_logits, _decode_logits(model, prompt, 4)) < 1e-5
    prepare_inference(model)
    model.double().float()
    assert model.fused is None and model.layers[0].fused is None
    prepare_inference(model)
    model.load_state_dict(model.state_dict())
    assert model.fused is None


def test_chain_switches_longrope_factors_and_adds_the_head_bias(tmp_path, monkeypatch):
    """Phi-3.5-MoE's longrope (long factors once the sequence outgrows the original context) and an output-head
    bias reach the whole-step path too: given to a mixtral model whose every block it covers, the step equals the
    modules on both sides of the switch."""
    hf_tiny_model("mixtral", tmp_path)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    half = model.rotary.inv_freq.numel()
    scaling = RopeScaling(
        type="longrope",
        factor=4.0,
        original_max_position=24,
        short_factor=tuple(1.0 + 0.1 * i for i in range(half)),
        long_factor=tuple(1.0 + i for i in range(half)),
    )
    model.rotary = RotaryEmbedding(model.rotary.inv_freq.numel() * 2, 10000.0, scaling)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(model.lm_head.out_features))
    taken = _spy(monkeypatch)
    prompt = torch.randint(3, 96, (1, 18), generator=torch.Generator().manual_seed(1))
    prepare_inference(model)
    fused = _decode_logits(model, prompt, 12)  # positions 18..29: the switch at 24
    assert taken["chain"] == 12
    model.drop_fused()
    reference = _decode_logits(model, prompt, 12)
    assert _rel(fused, reference) < 1e-5


def test_chain_checks_the_token_and_declines_what_it_does_not_compute(tmp_path, monkeypatch):
    hf_tiny_model("qwen3_moe", tmp_path)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    taken = _spy(monkeypatch)
    prompt = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    cache = KVCache()
    prepare_inference(model)
    with torch.no_grad():
        model(prompt, cache=cache)
        with pytest.raises(ValueError, match=r"ids outside the vocabulary: allowed \[0, 95\]"):
            model(torch.tensor([[96]]), cache=cache)
        assert cache.length == 5  # nothing was cached for the refused token
        model.set_backend("loop")  # a chosen reference backend is honoured: the modules run
        model(torch.tensor([[7]]), cache=cache)
        assert taken == {"chain": 0, "attention": 0, "ffn": 0}
        model.set_backend("auto")
        prepare_inference(model)
        model(torch.tensor([[7]]), cache=cache)
        assert taken["chain"] == 1
    model(torch.tensor([[7]]), cache=cache)  # gradients wanted: the modules
    assert taken["chain"] == 1


def test_chain_reports_each_layers_routing_as_the_modules_do(tmp_path):
    """return_routing keeps the one-call step (a server's telemetry at batch 1) and gives the experts the modules
    choose."""
    hf_tiny_model("qwen2_moe", tmp_path)
    model = moekit.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[5, 9, 13, 4]])
    outs = []
    for fused in (True, False):
        prepare_inference(model) if fused else model.drop_fused()
        cache = KVCache()
        with torch.no_grad():
            model(prompt, cache=cache)
            outs.append(model(torch.tensor([[7]]), cache=cache, return_routing=True))
    assert sorted(outs[0].moe) == sorted(outs[1].moe) and outs[0].moe
    for i in outs[0].moe:
        assert outs[0].moe[i].topk_ids_TK.sort().values.tolist() == outs[1].moe[i].topk_ids_TK.sort().values.tolist()
        assert torch.equal(outs[0].moe[i].tokens_per_expert_E, outs[1].moe[i].tokens_per_expert_E)
    assert _rel(outs[0].logits, outs[1].logits) < 1e-5
