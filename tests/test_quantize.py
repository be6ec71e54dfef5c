"""`moekit quantize`: a float checkpoint rewritten quantized, a precision per class of tensor, loads in moekit with
its weights kept quantized and computes exactly what the float model computes on the dequantized weights; saving
it again writes the same files; bad requests fail with one line and leave nothing behind."""

import json
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli.main import main
from moekit.experts.mixed import MixedExperts
from moekit.experts.quantized import QuantizedExperts
from moekit.layers.quantized_linear import QuantizedLinear
from moekit.quant.choices import check_one_method, parse_weights
from moekit.quant.held import set_int8_activations
from moekit.quant.quantize import quantize_checkpoint, random_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402
from peak_memory import loading_growth  # noqa: E402
from test_quant_load import _read  # noqa: E402

pytest.importorskip("transformers")


def _dequantized_twin(source: Path, quantized: moekit.MoEDecoder) -> moekit.MoEDecoder:
    """The float model of `source` with every weight the quantized model holds replaced by its dequantized value."""
    model = moekit.from_pretrained(source, dtype=torch.float32)
    for name, module in quantized.named_modules():
        if "experts.groups" in name:  # a MixedExperts' formats: dequantized through it
            continue
        twin = model.get_submodule(name)
        with torch.no_grad():
            if isinstance(module, QuantizedLinear):
                twin.weight.copy_(module.dequantized("weight", torch.float32))
            elif isinstance(module, (QuantizedExperts, MixedExperts)):
                for base in ("gate_up_proj", "down_proj"):
                    w = module.dequantized(base, torch.float32)
                    getattr(twin, base).copy_(w.transpose(1, 2) if twin.layout.transposed else w)
    return model


CASES = [
    ("qwen3_moe", {}, "experts=q4m,attention=q8,rest=q4"),
    ("deepseek_v3", {}, "experts=q4,shared=q8,attention=q8,head=q8"),
    ("gpt_oss", {"intermediate_size": 32}, "experts=mxfp4"),
    ("gpt_oss", {}, "experts=q4,attention=q8"),
    ("mixtral", {}, "rest=fp8"),
]


@pytest.mark.parametrize("family, overrides, weights", CASES)
def test_random_checkpoint_is_laid_out_as_a_quantized_one(family, overrides, weights, tmp_path):
    """random_checkpoint (real-size runs in minutes) writes the tensors, shapes, part dtypes and quantization_config
    that quantizing a float checkpoint of the same config writes, and moekit runs it."""
    hf_tiny_model(family, tmp_path / "hf", **overrides)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", weights)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf["num_nextn_predict_layers"] = 0  # transformers saves no MTP layer; random_checkpoint writes what configs say
    random_checkpoint(hf, tmp_path / "r", weights, seed=1)
    made, random = _read(tmp_path / "q"), _read(tmp_path / "r")
    assert {n: t.shape for n, t in made.items()} == {n: t.shape for n, t in random.items()}
    assert {n: t.dtype for n, t in made.items() if not t.is_floating_point() or t.dtype.itemsize == 1} == {
        n: t.dtype for n, t in random.items() if not t.is_floating_point() or t.dtype.itemsize == 1
    }
    config = lambda d: json.loads((d / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert config(tmp_path / "q") == config(tmp_path / "r")
    model = moekit.from_pretrained(tmp_path / "r", dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 5, 7, 9]])).float()
    assert torch.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("family, overrides, weights", CASES)
def test_quantized_checkpoint_computes_the_dequantized_model(family, overrides, weights, tmp_path):
    hf_tiny_model(family, tmp_path / "hf", **overrides)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", weights)
    model = moekit.from_pretrained(tmp_path / "q", dtype=torch.float32)
    held = {type(m) for m in model.modules()}
    assert QuantizedExperts in held and (QuantizedLinear in held) == (weights != "experts=mxfp4")
    twin = _dequantized_twin(tmp_path / "hf", model)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ref = model(ids), twin(ids)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    set_int8_activations(model, False)
    assert model.generate(ids[:1, :5], 8).tolist() == twin.generate(ids[:1, :5], 8).tolist()
    moekit.save_pretrained(moekit.from_pretrained(tmp_path / "q"), tmp_path / "again")
    before, after = _read(tmp_path / "q"), _read(tmp_path / "again")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(after[n].view(torch.uint8), t.view(torch.uint8)) for n, t in before.items())


def test_quantize_shrinks_what_it_should_and_reports_it(tmp_path, capsys):
    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert main(["quantize", str(tmp_path / "hf"), "--out", str(tmp_path / "q"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["classes"]
    assert report["experts"]["format"] == "q4" and report["attention"]["format"] == "q8"
    assert report["other"]["bytes_after"] == report["other"]["bytes_before"]  # norms and routers untouched
    bits = 8 * report["experts"]["bytes_after"] / report["experts"]["weights"]
    assert 4.5 <= bits < 5.5  # 4 bits + a bf16 scale per 32 (ragged 24-wide rows round the groups up)
    assert (tmp_path / "q" / "tokenizer.json").read_text() == "{}"
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    router = _read(tmp_path / "q")["model.layers.0.mlp.gate.weight"]
    assert router.dtype == torch.float32
    assert main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["stored"]
    assert stored["quantized"] == ["int4", "int8"]
    assert stored["bytes"] == sum(r["bytes_after"] for r in report.values())


def test_a_wrappers_language_model_is_quantized(tmp_path):
    """Kimi K2.5's files: the language model is what moekit quantizes and writes (DeepSeek-V3's names), never a
    silent copy of the wrapper's unmatched names."""
    hf_tiny_model("kimi_k25", tmp_path / "hf")
    report = quantize_checkpoint(tmp_path / "hf", tmp_path / "q", "experts=q4,rest=q8")
    assert report["experts"]["tensors"] and report["attention"]["tensors"]
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "deepseek_v3"
    model = moekit.from_pretrained(tmp_path / "q")
    assert any(isinstance(m, QuantizedExperts) for m in model.modules())


@pytest.mark.parametrize(
    "weights, message",
    [
        ("experts=q5", r"experts='q5' is invalid: allowed one of q8, q4, q4m, q3, q2, mxfp4, fp8"),
        ("router=q8", r"item 'router=q8' is invalid"),
        ("embedding=q4", r"embedding=q4 is invalid: allowed bf16, fp32, keep"),
        ("experts=fp8,rest=q8", r"mixes fp8, q8"),
        ("experts=bf16,rest=fp32", r"both bf16 and fp32"),
    ],
)
def test_bad_weight_specs(weights, message):
    with pytest.raises(ValueError, match=message):
        check_one_method(parse_weights(weights))


def test_refusals_leave_nothing_behind(tmp_path, capsys):
    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    assert main(["quantize", str(tmp_path / "hf"), "--out", str(tmp_path / "taken")]) == 2
    assert "taken: exists" in capsys.readouterr().err
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", "experts=q4")
    with pytest.raises(ValueError, match=r"already quantized \(quant_method 'compressed-tensors'\)"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", "experts=q4")
    with pytest.raises(ValueError, match=r"experts.0.down_proj.weight: weight input width 24 is invalid for MXFP4"):
        quantize_checkpoint(tmp_path / "hf", tmp_path / "m", "experts=mxfp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "q", "taken"]


def test_loading_a_quantized_checkpoint_costs_its_own_size(tmp_path):
    """Peak resident memory while loading grows by the quantized bytes, not by a float copy (within 1.15x)."""
    hf_tiny_model(
        "mixtral", tmp_path / "hf", hidden_size=512, intermediate_size=2048, num_hidden_layers=4, vocab_size=1024
    )
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", "experts=q4,rest=q8")
    size = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    grown = loading_growth(tmp_path / "q", warm=tmp_path / "hf")
    assert size > 50e6
    assert grown < 1.15 * size, (grown, size)
