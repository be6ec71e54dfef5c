"""The family registry: every family module is found, each tiny transformers config reads as its family, aliases
and unknown model types behave, and no code outside moekit/families branches on a family's name."""

import re
import sys
from pathlib import Path

import pytest

import moekit
from moekit.families import FAMILIES, NATIVE, family_of, get_family, model_from_hf, tensor_names
from moekit.families.base import Family

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import FAMILIES as TINY_FAMILIES  # noqa: E402
from hf_tiny import WRAPPED, tiny_config  # noqa: E402

PACKAGE = Path(moekit.__file__).parent


def test_every_family_module_is_registered():
    modules = {
        p.stem for p in (PACKAGE / "families").glob("*.py") if re.search(r"^FAMILY = ", p.read_text(), re.MULTILINE)
    }
    assert modules == set(FAMILIES)
    assert set(TINY_FAMILIES) | set(WRAPPED) == set(FAMILIES)
    assert all(isinstance(f, Family) and f.model_type == name for name, f in FAMILIES.items())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_config_reads_as_its_family(family):
    hf = tiny_config(family).to_dict()
    assert family_of(hf) is FAMILIES[family]
    assert model_from_hf(hf).family == family


def test_aliases_and_unknown_types():
    assert get_family("llama4") is FAMILIES["llama4_text"]
    assert tensor_names(NATIVE) == tensor_names("qwen3_moe")  # moekit's own format: the default names
    with pytest.raises(ValueError, match=r"model_type='bert' is unsupported: allowed one of dbrx, deepseek_v2"):
        get_family("bert")


def test_no_family_branches_outside_the_families():
    names = "|".join(re.escape(n) for f in FAMILIES.values() for n in (f.model_type, *f.aliases))
    pattern = re.compile(rf"""["']({names})["']""")
    offenders = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if "families" not in p.parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
