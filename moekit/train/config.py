"""What a training run is: a model (ModelConfig) and a TrainConfig, from presets, a TOML/YAML file and flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moekit._validate import check_choice, check_float, check_int, fail
from moekit.config.model import ModelConfig
from moekit.config.serialize import config_from_dict, config_to_dict, model_config_from_dict

TOKENIZERS = ("byte", "bpe")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """steps            optimizer steps; each sees batch_size * grad_accum sequences of seq_len tokens.
    lr, min_lr_ratio  peak learning rate after warmup_steps of linear warmup, cosine decay to lr * min_lr_ratio.
    weight_decay     AdamW decay on matrices (not on norms, biases or the balancer's bias, which is no parameter).
    grad_clip        clip the global gradient norm (0: off).
    dtype            float32, or bfloat16 autocast.
    mtp_weight       lambda of DeepSeek-V3's multi-token-prediction loss (used when model.mtp_layers >= 1).
    data             a text file, a directory of text files, or '' for the Python standard library's source.
    tokenizer        byte (vocabulary 256) or bpe (trained on the training text with `tokenizers`, vocab_size).
    eval_every, eval_batches  validation on held-out files; log_every; save_every, keep_last: checkpoints."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "float32"
    mtp_weight: float = 0.3
    seed: int = 0
    data: str = ""
    max_train_bytes: int = 8_000_000
    max_val_bytes: int = 200_000
    tokenizer: str = "byte"
    vocab_size: int = 1024
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 2
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("grad_accum", 1), ("warmup_steps", 0)):
            check_int(name, getattr(self, name), lo)
        for name, lo in (("eval_every", 1), ("eval_batches", 1), ("log_every", 1), ("save_every", 1)):
            check_int(name, getattr(self, name), lo)
        check_int("keep_last", self.keep_last, 1)
        check_int("seed", self.seed, 0)
        check_float("lr", self.lr, 0.0, lo_open=True)
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("beta1", self.beta1, 0.0, 1.0)
        check_float("beta2", self.beta2, 0.0, 1.0)
        check_float("grad_clip", self.grad_clip, 0.0)
        check_float("mtp_weight", self.mtp_weight, 0.0)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        check_int("vocab_size", self.vocab_size, 257)
        check_int("max_train_bytes", self.max_train_bytes, 1)
        check_int("max_val_bytes", self.max_val_bytes, 1)


def _tiny() -> dict:
    """A DeepSeek-V3-shaped fine-grained MoE in miniature: MLA, a dense first layer, 16 routed experts (top-4 within
    the best 2 of 4 groups, sigmoid scores), one shared expert, the auxiliary-loss-free bias. About 1.6M
    parameters, 0.6M active per token: trains in a few minutes on 2 CPU cores."""
    routing = dict(
        num_experts=16,
        top_k=4,
        score_func="sigmoid",
        n_group=4,
        topk_group=2,
        group_score="top2_sum",
        selection_bias=True,
        normalize=True,
        normalize_eps=1e-20,
    )
    return dict(
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        vocab_size=256,
        dense_hidden=384,
        moe_layers=[1, 2, 3],
        max_position=1024,
        attention=dict(
            kind="mla", kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, rope_interleave=True
        ),
        moe=dict(
            routing=routing,
            expert_hidden=96,
            num_shared_experts=1,
            shared_hidden=96,
            bias_update_rate=1e-3,
        ),
    )


def _scaled(base: dict, hidden: int, layers: int, heads: int, experts: int, top_k: int, f: int) -> dict:
    d = {**base, "hidden_size": hidden, "num_layers": layers, "num_heads": heads, "dense_hidden": 3 * hidden}
    d["moe_layers"] = list(range(1, layers))
    d["moe"] = {**base["moe"], "expert_hidden": f, "shared_hidden": f}
    d["moe"]["routing"] = {**base["moe"]["routing"], "num_experts": experts, "top_k": top_k, "n_group": 8}
    d["attention"] = {**base["attention"], "kv_lora_rank": hidden // 2, "qk_nope_head_dim": hidden // heads}
    d["attention"]["v_head_dim"] = hidden // heads
    return d


def _hybrid() -> dict:
    """The tiny preset's MoE in Qwen3-Next's hybrid stack: three Gated DeltaNet layers, then one gated full
    attention (per-head QK-norm, rope on a quarter of each head), RMSNorms stored as offsets from 1."""
    attention = dict(
        kind="gqa",
        qk_norm="head",
        output_gate=True,
        partial_rotary=0.25,
        layer_types=["linear", "linear", "linear", "full"],
        linear_key_heads=2,
        linear_value_heads=4,
        linear_key_dim=32,
        linear_value_dim=32,
    )
    return {**_tiny(), "num_kv_heads": 2, "head_dim": 64, "norm": "rms_offset", "attention": attention}


# name -> (model dict, train overrides)
PRESETS: dict[str, tuple[dict, dict]] = {
    "tiny": (_tiny(), {}),
    "tiny-hybrid": (_hybrid(), {}),
    "small": (_scaled(_tiny(), 256, 6, 8, 32, 6, 128), {"batch_size": 16, "seq_len": 256, "lr": 2e-3, "steps": 2000}),
    "base": (_scaled(_tiny(), 512, 8, 8, 64, 6, 256), {"batch_size": 32, "seq_len": 512, "lr": 1e-3, "steps": 10000}),
}


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as e:  # tomllib and yaml raise their own error types
        raise ValueError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: allowed a table with [model] and [train] sections")
    unknown = sorted(set(data) - {"preset", "model", "train"})
    if unknown:
        raise ValueError(f"{path}: section {unknown[0]!r} is unknown: allowed preset, model, train")
    return data


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_run_config(
    config_file: str | Path | None = None, preset: str | None = None, overrides: dict[str, Any] | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """Preset (default tiny), then the file's [model] / [train] tables merged over it, then flag overrides."""
    data = _read_file(Path(config_file)) if config_file else {}
    name = preset or data.get("preset", "tiny")
    if name not in PRESETS:
        fail("preset", name, f"one of {', '.join(PRESETS)}")
    model_dict, train_dict = PRESETS[name]
    model_dict = _merge(model_dict, data.get("model", {}))
    train_dict = {
        **train_dict,
        **data.get("train", {}),
        **{k: v for k, v in (overrides or {}).items() if v is not None},
    }
    model = model_config_from_dict(model_dict)
    train = config_from_dict(TrainConfig, train_dict, "train")
    return replace(model, name=f"moekit-{name}"), train


def run_config_dict(model: ModelConfig, train: TrainConfig) -> dict:
    return {"model": config_to_dict(model), "train": config_to_dict(train)}
