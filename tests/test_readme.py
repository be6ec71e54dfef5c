"""The README's Python example runs as written (the README is a promise)."""

from pathlib import Path

import torch


def test_building_from_configs_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("Building from configs:\n\n```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["logits"].shape == (4, 128, 256)
    assert scope["tokens"].shape == (1, 48)
    assert torch.equal(scope["fast"], scope["mtp_model"].generate(scope["ids"][:1, :16], 32))
