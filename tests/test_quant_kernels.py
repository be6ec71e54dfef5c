"""The kernel that reads quantized bytes (csrc/quant_gemv.cpp) equals its dequantize-then-fp32 reference with the
same activation rounding (int8 per group of 32) for every format it covers, on expert stacks (gate/up pieces
included) and linear layers, group counts that do and do not fill its eight-group steps, odd row counts; shapes it
does not cover fall back (once said) to dequantizing; a quantized model's decode with int8 activations stays
within the rounding of the exact one."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import moekit
from moekit.experts import backends
from moekit.experts.layout import ExpertLayout
from moekit.experts.quantized import QuantizedExperts
from moekit.experts.weights import ExpertWeights
from moekit.infer.cache import KVCache
from moekit.infer.fast import prepare_inference
from moekit.kernels.build import load_kernel
from moekit.kernels.quantized import covers, quant_gemv, quantized_activation
from moekit.layers.quantized_linear import QuantizedLinear
from moekit.quant.formats import Fp8Blocks, IntPacked, Mxfp4, PackedFp4
from moekit.quant.held import set_int8_activations

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="moekit's C++ kernels are not built here")

FORMATS = {
    "int8": IntPacked(bits=8),
    "int4": IntPacked(bits=4),
    "int4_asym": IntPacked(bits=4, symmetric=False),
    "int8_asym": IntPacked(bits=8, symmetric=False),
    "mxfp4": Mxfp4(),
    "fp4": PackedFp4(),  # DeepSeek-V4's packing of the same values
    "fp8": Fp8Blocks(),
    "fp8-16x8-ue8m0": Fp8Blocks(block=(16, 8), ue8m0=True),
    "fp8-e8m0-scales": Fp8Blocks(ue8m0=True, scale_dtype=torch.float8_e8m0fnu),  # DeepSeek-V4's scale bytes
}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _reference(q, base, ids=None):
    """moekit.quant's torch dequantization of weight base (of experts ids): the reference for every kernel."""
    shape, pieces = q.held(base)
    shape = shape if ids is None else (ids.numel(), *shape[1:])
    return q.fmt.dequantize(q.parts(base, ids), shape, pieces, name=base)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("pieces", [1, 2])
def test_dequantize_kernel_equals_torch_bit_for_bit(name, pieces):
    torch.manual_seed(2)
    q = QuantizedExperts.like(ExpertWeights(5, 96, 64, ExpertLayout()), FORMATS[name], gate_up_pieces=pieces)
    with torch.no_grad():
        for base in ("gate_up_proj", "down_proj"):
            for ids in (None, torch.tensor([3]), torch.tensor([4, 0, 4])):
                assert torch.equal(q.dequantized(base, torch.float32, ids), _reference(q, base, ids))
        linear = QuantizedLinear.like(torch.nn.Linear(320, 37), FORMATS[name])  # odd row count
        assert torch.equal(linear.dequantized("weight", torch.float32), _reference(linear, "weight"))
        assert linear.kernel_cache().get("weight") is not None  # the kernel did it


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("d, f, pieces", [(288, 96, 2), (96, 40, 1), (64, 64, 2)])
def test_expert_products_equal_the_dequantized_reference(name, d, f, pieces):
    fmt = FORMATS[name]
    if name in ("mxfp4", "fp4") and f % 32:
        pytest.skip("MXFP4 needs input widths that are multiples of 32")
    torch.manual_seed(0)
    q = QuantizedExperts.like(ExpertWeights(5, d, f, ExpertLayout()), fmt, gate_up_pieces=pieces)
    ids = torch.tensor([4, 0, 2])
    with torch.no_grad():
        for base, width in (("gate_up_proj", d), ("down_proj", f)):
            x = torch.randn(3, width) * torch.logspace(-2, 1, width)  # groups of very different magnitudes
            y = quant_gemv(q, base, ids, x)
            fp8 = name.startswith("fp8")  # fp32 activations, any width
            if width % 32 and not fp8:
                assert y is None and not covers(q, base)
                continue
            rounded = x if fp8 else quantized_activation(x)
            ref = torch.bmm(_reference(q, base, ids), rounded.unsqueeze(-1))
            assert _rel(y, ref.squeeze(-1)) < 1e-5
            shared = quant_gemv(q, base, ids, x[:1].expand(3, -1))  # one row for all k experts
            ref = _reference(q, base, ids) @ (x[0] if fp8 else quantized_activation(x[0]))
            assert _rel(shared, ref) < 1e-5


@pytest.mark.parametrize("name", FORMATS)
def test_linear_one_row_reads_the_bytes(name):
    torch.manual_seed(1)
    linear = torch.nn.Linear(320, 37)
    q = QuantizedLinear.like(linear, FORMATS[name])
    x = torch.randn(1, 1, 320)
    rounded = x if name.startswith("fp8") else quantized_activation(x)
    with torch.no_grad():
        ref = torch.nn.functional.linear(rounded, _reference(q, "weight"), q.bias)
        assert _rel(q(x), ref) < 1e-5
        exact = torch.nn.functional.linear(x, _reference(q, "weight"), q.bias)
        assert _rel(q(x), exact) < 0.02  # int8 activations: a percent at most
        set_int8_activations(q, False)
        assert torch.equal(q(x), exact)
        assert name.startswith("fp8") or not torch.equal(q(x), ref)


def test_uncovered_shapes_dequantize_and_say_so_once(monkeypatch):
    monkeypatch.setattr(backends, "_SAID", set())
    q = QuantizedExperts.like(ExpertWeights(4, 40, 40, ExpertLayout()), IntPacked(bits=4))  # 40 wide inputs
    backend = backends.get_backend("grouped")
    x = torch.randn(1, 40)
    with torch.no_grad(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(3):
            y = backend.one_token(x, torch.tensor([1, 3]), torch.tensor([0.5, 0.5]), q, "output")
    assert len([w for w in said if "no kernel reads int4" in str(w.message)]) == 1
    ref = sum(0.5 * (_reference(q, "down_proj")[e] @ _act(q, e, x)) for e in (1, 3))
    assert _rel(y[0], ref[:, 0]) < 1e-5


def _act(q, e, x):
    h = _reference(q, "gate_up_proj")[e] @ x[0]
    gate, up = h.chunk(2)
    return (torch.nn.functional.silu(gate) * up).unsqueeze(-1)


sys.path.insert(0, str(Path(__file__).parent))


def _decode_logits(model, ids, steps):
    """The logits of `steps` one-token decode steps after the prompt (the path the kernels serve)."""
    cache, out = KVCache(), []
    logits = model(ids, cache=cache)[:, -1]
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        logits = model(token, cache=cache)[:, -1]
        out.append(logits)
    return torch.cat(out)


def test_quantized_decode_stays_within_activation_rounding(tmp_path):
    from hf_tiny import hf_tiny_model

    from moekit.quant.quantize import quantize_checkpoint

    hf_tiny_model("qwen3_moe", tmp_path / "hf", hidden_size=64, moe_intermediate_size=32, intermediate_size=64)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", "experts=q4,rest=q8")
    model = moekit.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = _decode_logits(model, ids, 4)
        set_int8_activations(model, False)
        exact = _decode_logits(model, ids, 4)
    assert 0 < _rel(fast, exact) < 0.02  # the kernels ran (int8 activations), within their rounding


@pytest.mark.parametrize("weights", ["experts=q4", "experts=q8", "experts=fp8"])
def test_fused_decode_step_takes_quantized_experts(tmp_path, weights):
    from hf_tiny import hf_tiny_model

    from moekit.quant.quantize import quantize_checkpoint

    hf_tiny_model("qwen3_moe", tmp_path / "hf", hidden_size=64, moe_intermediate_size=32, intermediate_size=64)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", weights)
    model = moekit.from_pretrained(tmp_path / "q", dtype=torch.float32)
    report = prepare_inference(model)
    assert report["chain"] and set(model.config.moe_layers) <= set(report["ffn"]) and report["moe"] == []
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused = _decode_logits(model, ids, 4)
        model.drop_fused()
        eager = _decode_logits(model, ids, 4)  # the modules, the same kernels for the experts
    assert _rel(fused, eager) < 1e-5


@pytest.mark.parametrize(
    "family, weights",
    [("qwen3_moe", "experts=q4,rest=q8"), ("qwen2_moe", "rest=q8"), ("qwen2_moe", "experts=q8,rest=q4")],
)
def test_fused_chain_takes_quantized_attention_shared_and_head(tmp_path, family, weights):
    """Attention projections, shared experts and the head held quantized stay inside the fused chain, which equals
    the modules reading the same bytes."""
    from hf_tiny import hf_tiny_model

    from moekit.quant.quantize import quantize_checkpoint

    extra = {"shared_expert_intermediate_size": 64} if family == "qwen2_moe" else {}
    hf_tiny_model(family, tmp_path / "hf", hidden_size=64, moe_intermediate_size=32, intermediate_size=64, **extra)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", weights)
    model = moekit.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.layers[0].self_attn.q_proj, QuantizedLinear)
    report = prepare_inference(model)
    assert report["chain"] and report["attention"] == list(range(len(model.layers))) and report["moe"] == []
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fused = _decode_logits(model, ids, 4)
        model.drop_fused()
        eager = _decode_logits(model, ids, 4)
    assert _rel(fused, eager) < 1e-5
