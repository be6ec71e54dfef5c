"""The MoE block of each published family equals transformers' own block on the same weights (fp32)."""

import importlib

import pytest
import torch

from moekit import MoEBlock
from moekit.families import moe_from_hf

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE",
    "gpt_oss": "GptOssMLP",
    "llama4_text": "Llama4TextMoe",
}

RENAMES = [
    ("gate.e_score_correction_bias", "router.selection_bias_E"),
    ("gate.weight", "router.weight"),
    ("shared_experts.", "shared_experts."),
    ("shared_expert.", "shared_experts."),
]


def _moekit_name(hf_name: str) -> str:
    for old, new in RENAMES:
        if hf_name.startswith(old):
            return new + hf_name[len(old) :]
    return hf_name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_matches_transformers(family):
    module = family.replace("_text", "")
    hf_mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    cfg = transformers.AutoConfig.for_model(
        family,
        hidden_size=32,
        intermediate_size=24,
        moe_intermediate_size=24,
        num_local_experts=8,
        num_experts=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        shared_expert_intermediate_size=40,
        norm_topk_prob=True,
        num_hidden_layers=2,
    )
    torch.manual_seed(0)
    hf_block = getattr(hf_mod, FAMILIES[family])(cfg).eval()
    with torch.no_grad():
        for p in list(hf_block.parameters()) + list(hf_block.buffers()):
            p.normal_(std=0.5)
    moe_cfg, _, _ = moe_from_hf(cfg.to_dict())
    block = MoEBlock(32, moe_cfg).eval()
    state = {_moekit_name(n): t for n, t in hf_block.state_dict().items()}
    missing, unexpected = block.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("load_E")], (missing, unexpected)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = hf_block(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        for backend in ("loop", "grouped"):
            block.set_backend(backend)
            y, _ = block(x)
            rel = float((y - ref.view_as(y)).norm() / ref.norm())
            assert rel < 1e-5, (backend, rel)
