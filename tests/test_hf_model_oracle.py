"""Whole models of every published family equal transformers' own model on the same weights (fp32): attention
variants (MLA with yarn, sinks with sliding windows, chunked + NoPE + L2 QK-norm with llama3 rope, QK-norm over the
full projection with clip_qkv), MoE blocks, dense layers and layer placement, on a padded batch."""

import sys
from pathlib import Path

import pytest
import torch

from moekit.checkpoint.keymap import KeyMap
from moekit.config.hf_model import model_from_hf
from moekit.model.decoder import MoEDecoder

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import FAMILIES, tiny_config  # noqa: E402

transformers = pytest.importorskip("transformers")


def _randomise(hf_model) -> None:
    """Norm weights, biases, sinks and the selection bias are 1/0 at init: perturb them so they are tested."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name or "sinks" in name or "bias" in name:
                p.normal_(std=0.3).add_(1.0 if "norm" in name else 0.0)
        for name, b in hf_model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(std=0.3)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_matches_transformers(family):
    cfg = tiny_config(family)
    hf_model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomise(hf_model)
    model_cfg = model_from_hf(cfg.to_dict())
    model = MoEDecoder(model_cfg).eval()
    keymap = KeyMap(model_cfg)
    state = {keymap.to_moekit(k): v for k, v in hf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert not [k for k in missing if not k.endswith("load_E") and not k.startswith("mtp.")]
    ids = torch.randint(3, cfg.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # the second sequence is 8 tokens long, padded on the right
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).logits
        out = model(ids, mask)
    real = mask.bool()
    assert torch.isfinite(out).all()
    rel = float((out[real] - ref[real]).norm() / ref[real].norm())
    assert rel < 1e-4, rel
