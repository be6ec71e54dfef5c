"""Quantized checkpoints as they ship: a tiny transformers model, its weights written by the test in exactly the
shipped layout (gpt-oss's MXFP4 experts, FP8 e4m3 with block scales on every linear layer as Qwen3-FP8 and
DeepSeek-V3 ship them, Kimi-K2.5's compressed-tensors INT4 routed experts), loaded by moekit: the weights stay in
their bytes, the logits equal transformers' on the dequantized weights, greedy tokens agree, and a save writes the
same files back bit for bit. Bad scales and configs fail with one line naming the file and tensor."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.experts.quantized import QuantizedExperts
from moekit.layers.quantized_linear import QuantizedLinear
from moekit.quant import fp8_blocks, int_pack, mxfp4
from moekit.quant.held import set_int8_activations

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402

transformers = pytest.importorskip("transformers")


def _read(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _mxfp4(name, t):
    """gpt-oss: the stacked experts (transformers holds them input-major) as output-major MXFP4 blocks."""
    if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return None
    blocks, scales = mxfp4.quantize(t.transpose(1, 2))
    deq = mxfp4.dequantize(blocks, scales).transpose(1, 2)
    return {f"{name}_blocks": blocks, f"{name}_scales": scales}, deq


def _fp8(block, ue8m0=False):
    def quantize(name, t):
        if t.dim() != 2 or not name.endswith("proj.weight") or "norm" in name:
            return None  # routers (mlp.gate), norms, embeddings and the head stay as they are
        q, scale = fp8_blocks.quantize(t, block, ue8m0=ue8m0)
        return {name: q, f"{name}_scale_inv": scale}, fp8_blocks.dequantize(q, scale, block)

    return quantize


def _int4(name, t):
    """Kimi-K2.5: only the routed experts, group 32."""
    if ".mlp.experts." not in name:
        return None
    packed, scale, _ = int_pack.quantize(t)
    scale = scale.to(torch.bfloat16)
    base = name.removesuffix("weight")
    parts = {f"{base}weight_packed": packed, f"{base}weight_scale": scale}
    parts[f"{base}weight_shape"] = torch.tensor(t.shape)
    return parts, int_pack.dequantize(packed, scale, tuple(t.shape))


def _fp8_fp4(name, t):
    """DeepSeek-V4 as released: routed experts in packed FP4 (int8, two e2m1 per byte, UE8M0 scales per 32), the
    other linear layers FP8 in 128 x 128 blocks with UE8M0 scales, each beside its weight as X.scale."""
    base = name.removesuffix("weight")
    if ".ffn.experts." in name:
        blocks, scales = mxfp4.quantize(t)
        deq = mxfp4.dequantize(blocks, scales)
        return {name: blocks.flatten(-2).view(torch.int8), f"{base}scale": scales.view(torch.float8_e8m0fnu)}, deq
    if not (name.endswith("weight") and t.dim() == 2 and (".attn.w" in name or ".shared_experts." in name)):
        return None  # routers, norms, embeddings, the head, hyper-connections, compressors and indexer: bf16
    q, scale = fp8_blocks.quantize(t, (128, 128), ue8m0=True)
    return {name: q, f"{base}scale": scale.to(torch.float8_e8m0fnu)}, fp8_blocks.dequantize(q, scale, (128, 128))


INT4_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
        }
    },
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
}
CASES = {
    "gpt_oss-mxfp4": ("gpt_oss", {"intermediate_size": 32}, _mxfp4, {"quant_method": "mxfp4"}),
    "qwen3_moe-fp8": (
        "qwen3_moe",
        {},
        _fp8((16, 16)),
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]},
    ),
    "deepseek_v3-fp8-ue8m0": (
        "deepseek_v3",
        {},
        _fp8((128, 128), ue8m0=True),
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
    ),
    "deepseek_v3-int4": ("deepseek_v3", {}, _int4, INT4_CONFIG),
    "deepseek_v4-fp8-fp4": (
        "deepseek_v4",
        {"moe_intermediate_size": 32, "intermediate_size": 32},  # MXFP4 groups of 32
        _fp8_fp4,
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
    ),
}
TOP_LEVEL = {"deepseek_v4-fp8-fp4": {"expert_dtype": "fp4"}}  # config.json fields beside quantization_config


def _shipped(case: str, root: Path):
    """(transformers model on the dequantized weights, quantized checkpoint dir): the float tensors in bf16 as the
    shipped checkpoints hold them (DeepSeek's selection bias in fp32)."""
    family, overrides, quantize, qc = CASES[case]
    hf_tiny_model(family, root / "hf", **overrides)
    quantized, dequantized = {}, {}
    for name, t in _read(root / "hf").items():
        # DeepSeek ships its selection biases in fp32
        keep = name.endswith(("e_score_correction_bias", ".gate.bias")) or not t.is_floating_point()
        t = t if keep else t.to(torch.bfloat16)
        made = quantize(name, t.float())
        parts, deq = made if made is not None else ({name: t}, t.float())
        quantized.update(parts)
        dequantized[name] = deq
    config = json.loads((root / "hf" / "config.json").read_text())
    for directory, tensors, extra in (
        (root / "q", quantized, {"quantization_config": qc, **TOP_LEVEL.get(case, {})}),
        (root / "deq", dequantized, {}),
    ):
        directory.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({**config, **extra}))
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "deq", dtype=torch.float32).eval()
    return reference, root / "q"


@pytest.mark.parametrize("case", CASES)
def test_shipped_format_loads_quantized_and_equals_the_dequantized_model(case, tmp_path):
    reference, directory = _shipped(case, tmp_path)
    model = moekit.from_pretrained(directory, dtype=torch.float32)
    quantized = [m for m in model.modules() if isinstance(m, (QuantizedExperts, QuantizedLinear))]
    assert quantized and any(isinstance(m, QuantizedExperts) for m in quantized)
    for m in quantized:  # the bytes as shipped: no float copy of a quantized weight anywhere
        held = (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.int32)
        assert all(b.dtype in held for n, b in m.named_buffers() if "scale" not in n)
        assert all(n.endswith("bias") for n, _ in m.named_parameters(recurse=False))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = reference(input_ids=ids).logits, model(ids)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    prompt = ids[:1, :7]
    set_int8_activations(model, False)  # decode as the float model computes (test_quant_kernels checks the kernels)
    reference.generation_config.eos_token_id = None
    expected = reference.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, 12).tolist() == expected.tolist()


@pytest.mark.parametrize("case", CASES)
def test_save_writes_the_shipped_files_back_bit_for_bit(case, tmp_path):
    _, directory = _shipped(case, tmp_path)
    model = moekit.from_pretrained(directory)  # the checkpoint's own dtypes
    moekit.save_pretrained(model, tmp_path / "again")
    before, after = _read(directory), _read(tmp_path / "again")
    # DeepSeek-V4's release names a scale X.scale; moekit writes transformers' name, X.weight_scale_inv
    before = {k.removesuffix("scale") + "weight_scale_inv" if k.endswith(".scale") else k: t for k, t in before.items()}
    assert sorted(after) == sorted(before)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["quantization_config"] == json.loads((directory / "config.json").read_text())["quantization_config"]


def test_mxfp4_experts_hold_4_25_bits_per_weight(tmp_path):
    _, directory = _shipped("gpt_oss-mxfp4", tmp_path)
    model = moekit.from_pretrained(directory)
    experts = model.layers[0].mlp.experts
    weights = sum(torch.Size(experts.held(b)[0]).numel() for b in experts.held_weights())
    assert 8 * experts.held_bytes() / weights == mxfp4.BITS_PER_WEIGHT
    model.float()  # a dtype change leaves the bytes alone
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and experts.gate_up_proj_bias.dtype == torch.float32


def _edit(directory: Path, edit) -> None:
    tensors = _read(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_bad_scales_and_parts_are_named(tmp_path):
    _, directory = _shipped("qwen3_moe-fp8", tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    _edit(directory, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(ValueError, match=rf"q: {name}_?: holds NaN or inf|{name}: holds NaN"):
        moekit.from_pretrained(directory)
    _edit(directory, lambda t: t.__setitem__(name, torch.ones(1, 1)))
    with pytest.raises(
        ValueError, match=rf"model.safetensors: tensor '{name}' has shape \[1, 1\], the config implies \[2, 2\]"
    ):
        moekit.from_pretrained(directory)
    weight = name.removesuffix("_scale_inv")
    _edit(
        directory,
        lambda t: (t.__setitem__(name, torch.ones(2, 2)), t.__setitem__(weight, t[weight].to(torch.bfloat16))),
    )
    with pytest.raises(
        ValueError,
        match=rf"tensor '{weight}' is torch.bfloat16, the checkpoint's format holds it as torch.float8_e4m3fn",
    ):
        moekit.from_pretrained(directory)


def test_bad_mxfp4_and_int4_parts_are_named(tmp_path):
    _, directory = _shipped("gpt_oss-mxfp4", tmp_path / "a")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    _edit(directory, lambda t: t[name].view(-1).__setitem__(3, 255))
    with pytest.raises(ValueError, match=rf"{name}: MXFP4 scale byte 255"):
        moekit.from_pretrained(directory)
    _, directory = _shipped("deepseek_v3-int4", tmp_path / "b")
    name = "model.layers.2.mlp.experts.5.down_proj.weight_shape"
    _edit(directory, lambda t: t.__setitem__(name, torch.tensor([32, 23])))
    with pytest.raises(ValueError, match=rf"{name} is \[32, 23\], the config implies \[32, 24\]"):
        moekit.from_pretrained(directory)


@pytest.mark.parametrize(
    "qc, message",
    [
        ({"quant_method": "awq"}, r"quant_method='awq' is unsupported: allowed 'mxfp4', 'fp8', 'compressed-tensors'"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, r"fmt='e5m2' is unsupported"),
        ({**INT4_CONFIG, "format": "float-quantized"}, r"format='float-quantized' is unsupported"),
    ],
)
def test_unsupported_quantization_configs(tmp_path, qc, message):
    _, directory = _shipped("deepseek_v3-int4", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(ValueError, match=message):
        moekit.from_pretrained(directory)
