"""moekit.from_pretrained(..., quantize=SPEC): the float modules quantized while loading hold exactly the parts
`moekit quantize` writes for them, slice by slice (bounded memory); what a checkpoint ships quantized stays as it
is; requests loading cannot honour fail with one line."""

import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.layers.quantized_linear import QuantizedLinear
from moekit.quant import held
from moekit.quant.choices import CHOICES
from moekit.quant.quantize import quantize_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402

pytest.importorskip("transformers")

CASES = [
    ("qwen3_moe", {}, "attention=q8,head=q4m,dense=q4"),
    ("deepseek_v3", {}, "shared=q8,attention=q4,dense=q4m,head=q8"),
    ("gpt_oss", {}, "experts=q4,attention=q8,head=q8"),  # stacked experts, input-major in the files
    ("mixtral", {}, "rest=fp8,experts=keep"),
]


@pytest.mark.parametrize("family, overrides, spec", CASES)
def test_quantizing_while_loading_equals_moekit_quantize(family, overrides, spec, tmp_path):
    hf_tiny_model(family, tmp_path / "hf", **overrides)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", spec)
    written = moekit.from_pretrained(tmp_path / "q", dtype=torch.float32).state_dict()
    loaded = moekit.from_pretrained(tmp_path / "hf", dtype=torch.float32, quantize=spec)
    state = loaded.state_dict()
    assert state.keys() == written.keys()
    for name, tensor in state.items():
        assert tensor.dtype == written[name].dtype and torch.equal(tensor, written[name]), name
    assert any("quantized to" in note for note in loaded.load_notes)


def test_shipped_formats_stay_and_the_rest_is_quantized(tmp_path):
    hf_tiny_model("gpt_oss", tmp_path / "hf", intermediate_size=32)
    quantize_checkpoint(tmp_path / "hf", tmp_path / "mx", "experts=mxfp4")
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q8", "attention=q8,head=q8")
    shipped = moekit.from_pretrained(tmp_path / "mx", dtype=torch.float32).state_dict()
    rest = moekit.from_pretrained(tmp_path / "q8", dtype=torch.float32).state_dict()
    model = moekit.from_pretrained(tmp_path / "mx", dtype=torch.float32, quantize="rest=q8")
    for name, tensor in model.state_dict().items():
        expected = shipped[name] if ".experts." in name else rest[name]
        assert torch.equal(tensor, expected), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]]))).all()


@pytest.mark.parametrize("choice", ["q8", "q4", "q4m", "q3", "q2", "mxfp4", "fp8"])
def test_store_a_slice_at_a_time_equals_all_at_once(choice, monkeypatch):
    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = QuantizedLinear(256, 300, CHOICES[choice])
    whole.store("weight", w)
    monkeypatch.setattr(held, "STORE_ROWS", 128)  # 3 slices, the last ragged
    sliced = QuantizedLinear(256, 300, CHOICES[choice])
    sliced.store("weight", w)
    for name, part in whole.state_dict().items():
        assert torch.equal(part, sliced.state_dict()[name]), name


def test_requests_loading_cannot_honour_fail_in_one_line(tmp_path):
    hf_tiny_model("mixtral", tmp_path / "hf")
    with pytest.raises(ValueError, match="one tensor per expert"):
        moekit.from_pretrained(tmp_path / "hf", quantize="experts=q4")
    with pytest.raises(ValueError, match="is a dtype"):
        moekit.from_pretrained(tmp_path / "hf", quantize="attention=bf16")
    with pytest.raises(ValueError, match="allowed one of"):
        moekit.from_pretrained(tmp_path / "hf", quantize="attention=q5")


def test_conversions_read_through_a_bounded_buffer(tmp_path, monkeypatch):
    from moekit.checkpoint import files

    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    whole = moekit.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).state_dict()
    monkeypatch.setattr(files, "CONVERT_BYTES", 100)  # many reads per tensor, a ragged last one
    for name, tensor in moekit.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).state_dict().items():
        assert torch.equal(tensor, whole[name]), name
