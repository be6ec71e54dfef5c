"""Rotary frequencies of every scaling scheme equal transformers' own initialisers."""

import pytest
import torch

from moekit.config.attention import RopeScaling
from moekit.layers.rope import RotaryEmbedding, rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

CASES = {
    "yarn": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "yarn_gpt_oss": {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
}


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_match_transformers(name):
    params = {**CASES[name], "rope_theta": 50000.0}
    cfg = transformers.LlamaConfig(
        hidden_size=512, num_attention_heads=4, head_dim=128, rope_parameters=params, max_position_embeddings=131072
    )
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    inv, factor = rope_frequencies(128, 50000.0, RopeScaling.from_hf(params, 131072))
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor)


def test_longrope_switches_to_long_factors_past_the_original_context():
    short, long = [1.0, 1.5, 2.0, 3.0], [2.0, 4.0, 8.0, 16.0]
    params = {
        "rope_type": "longrope",
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    }
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=4, head_dim=8, rope_parameters=params, max_position_embeddings=256
    )
    scaling = RopeScaling.from_hf(params, 256)
    for seq_len, is_long in ((64, False), (65, True)):
        ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=seq_len)
        inv, factor = rope_frequencies(8, 10000.0, scaling, long=is_long)
        torch.testing.assert_close(inv, ref_inv.float())
        assert factor == pytest.approx(ref_factor)  # sqrt(1 + ln 4 / ln 64) with no mscale given
    rotary = RotaryEmbedding(8, 10000.0, scaling)
    cos_short, _ = rotary(torch.arange(64)[None], torch.float32)
    cos_long, _ = rotary(torch.arange(65)[None], torch.float32)
    assert not torch.allclose(cos_short[0, 10], cos_long[0, 10])  # the whole sequence re-rotates past 64
