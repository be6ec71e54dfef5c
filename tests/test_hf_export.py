"""A model built in moekit is saved as the Hugging Face family that computes the same thing, and only then: every
published family's config survives moekit -> config.json -> moekit where a writer exists, serialisation of configs
is exact, and a config no family expresses is saved in moekit's own format."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from moekit.checkpoint.export import hf_family_for
from moekit.config.serialize import config_to_dict, model_config_from_dict
from moekit.families import model_from_hf

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import FAMILIES, tiny_config  # noqa: E402

pytest.importorskip("transformers")
WRITTEN = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trip(family):
    cfg = model_from_hf(tiny_config(family).to_dict())
    assert model_config_from_dict(config_to_dict(cfg)) == cfg
    got, hf = hf_family_for(replace(cfg, family="moekit", extra={}))
    if family in WRITTEN:
        assert got == family
        again = model_from_hf(hf)
        assert replace(again, family="moekit", name="") == replace(cfg, family="moekit", name="", extra={})
    else:
        assert got is None and isinstance(hf, str)


def test_unknown_config_field_is_named():
    d = config_to_dict(model_from_hf(tiny_config("mixtral").to_dict()))
    d["moe"]["routing"]["topk"] = 2
    with pytest.raises(ValueError, match=r"moe\.routing\.topk is not a RoutingSpec field"):
        model_config_from_dict(d)
