"""From a moekit ModelConfig to the config.json of a Hugging Face family that computes the same thing, so a model
trained with moekit loads in transformers. Each writing family spells out every field transformers would otherwise
default; the result is then read back with moekit's own reader (model_from_hf) and must give the same model, or
the family is refused. Never a silently different model."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

from moekit.config.model import ModelConfig
from moekit.families import FAMILIES, model_from_hf

# Fields that change how a model trains, not what it computes at inference: left out of the comparison.
TRAINING_ONLY_MOE = dict(
    aux_loss_coef=0.0,
    seq_aux_loss_coef=0.0,
    z_loss_coef=0.0,
    bias_update_rate=0.0,
    jitter=0.0,
    backend="auto",
    matmul="auto",
)


def inference_view(cfg: ModelConfig) -> ModelConfig:
    """The config with everything that only matters to training (and names) set to fixed values."""
    moe = replace(cfg.moe, **TRAINING_ONLY_MOE) if cfg.moe else None
    return replace(cfg, moe=moe, family="moekit", name="", init_std=0.02, extra={})


def hf_family_for(cfg: ModelConfig) -> tuple[str, dict] | tuple[None, str]:
    """(family, config.json dict) of the first Hugging Face family that computes exactly cfg, or (None, why not)."""
    if cfg.moe is None or not cfg.moe_layers:
        return None, "a model without MoE layers has no MoE family"
    want = inference_view(cfg)
    reasons = []
    writers = sorted((f for f in FAMILIES.values() if f.write_rank is not None), key=lambda f: f.write_rank)
    for writer in writers:
        family = writer.model_type
        try:
            hf = writer.write(cfg)
            got = inference_view(model_from_hf(hf))
        except (ValueError, TypeError, KeyError) as e:
            reasons.append(f"{family}: {e}")
            continue
        if got == want:
            return family, hf
        reasons.append(f"{family}: differs in {', '.join(_differences(got, want))}")
    return None, "; ".join(reasons)


def _differences(a, b, prefix: str = "") -> list[str]:
    out = []
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x != y:
            if is_dataclass(x) and is_dataclass(y):
                out += _differences(x, y, f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")
    return out
