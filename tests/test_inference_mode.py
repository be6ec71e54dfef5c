"""Every path runs under torch.inference_mode(), as servers and users run inference, and gives what it gives under
torch.no_grad(): long prompts (the kernels' threads write outputs made in inference mode), decoding, quantized
models, both backends."""

import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.quant.quantize import quantize_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402

pytest.importorskip("transformers")


@pytest.mark.parametrize("family, weights", [("qwen3_moe", None), ("deepseek_v3", None), ("mixtral", "rest=q8")])
def test_inference_mode_equals_no_grad(family, weights, tmp_path):
    hf_tiny_model(family, tmp_path / "hf")
    path = tmp_path / "hf"
    if weights:
        quantize_checkpoint(path, tmp_path / "q", weights)
        path = tmp_path / "q"
    model = moekit.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 96, (2, 300), generator=torch.Generator().manual_seed(0))  # long: segments go to MKL
    for backend in ("grouped", "loop"):
        model.set_backend(backend)
        with torch.no_grad():  # generate installs the fused steps: the forward after it is the one compared
            tokens = model.generate(ids[:1, :40], 6)
            expected = model(ids)
        with torch.inference_mode():
            assert torch.equal(model(ids), expected)
            assert torch.equal(model.generate(ids[:1, :40], 6), tokens)
