"""moekit plan: parameter counts against published figures and transformers, KV bytes, roofline, cost, errors."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from moekit.cli.main import main
from moekit.families import load_model_config, model_from_hf
from moekit.model.count import count_parameters
from moekit.model.decoder import MoEDecoder
from moekit.plan import plan
from moekit.plan.model_stats import model_stats
from moekit.plan.roofline import distinct_experts

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import FAMILIES, WRAPPED, hf_build, hf_tiny_model, tiny_config  # noqa: E402

# ../shared/model-configs/README.md: (name, published figure as written, which count it is)
PUBLISHED = [
    ("deepseek-v3", "671", "total"),
    ("deepseek-v3", "37", "active_truncated"),
    ("deepseek-v3", "36.6", "active_without_input_embedding"),
    ("deepseek-v3", "685", "total_with_mtp"),
    ("deepseek-v2-lite", "15.7", "total"),
    ("deepseek-v2-lite", "2.4", "active_without_input_embedding_truncated"),
    ("qwen3-30b-a3b", "30.5", "total"),
    ("qwen3-30b-a3b", "3.3", "active_truncated"),
    ("qwen1.5-moe-a2.7b", "14.3", "total"),
    ("qwen1.5-moe-a2.7b", "2.7", "active"),
    ("mixtral-8x7b", "46.7", "total"),
    ("mixtral-8x7b", "12.9", "active"),
    ("olmoe-1b-7b-0924", "6.9", "total"),
    ("olmoe-1b-7b-0924", "1.3", "active"),
    ("gpt-oss-20b", "20.9", "total"),
    ("gpt-oss-20b", "3.6", "active_without_input_embedding"),
    ("llama-4-scout-17b-16e", "107.8", "total"),
    ("llama-4-scout-17b-16e", "17", "active"),
    ("kimi-k2.5", "32", "active_truncated"),
    ("mistral-small-4-119b", "119", "total"),
    ("mistral-small-4-119b", "6", "active_without_input_embedding"),
    ("mimo-v2-flash", "309", "total"),
    ("mimo-v2-flash", "15", "active"),
    ("deepseek-v3.2", "671", "total"),
    ("deepseek-v3.2", "37", "active_without_input_embedding_truncated"),
    ("glm-5", "744", "total"),
    ("glm-5", "40", "active_without_embeddings"),
    ("deepseek-v4-flash", "284", "total"),
    ("deepseek-v4-flash", "13", "active_without_input_embedding"),
    ("deepseek-v4-pro", "1.6T", "total"),
    ("deepseek-v4-pro", "49", "active_without_input_embedding"),
    ("granite-3.1-1b-a400m", "1.3", "total"),  # IBM's Granite 3.0/3.1 report; the config's name says A400M
    ("granite-3.1-1b-a400m", "0.4", "active"),
    ("qwen3.5-35b-a3b", "35", "total"),
    ("qwen3.5-35b-a3b", "3", "active_without_input_embedding"),
    ("jamba-1.5-mini", "52", "total"),
    ("jamba-1.5-mini", "12", "active"),
]
# ../shared/model-configs/README.md: transformers' own count of the same config (billions, two decimals), where the
# published figure is rounded beyond use (Kimi's "1T" is 1026.41B)
TRANSFORMERS_COUNTS = [("kimi-k2.5", 1026.41), ("mistral-small-4-119b", 118.97), ("mimo-v2-flash", 308.78)]
TRANSFORMERS_COUNTS += [("deepseek-v3.2", 671.88), ("glm-5", 743.91), ("deepseek-v4-flash", 284.33)]
TRANSFORMERS_COUNTS += [("deepseek-v4-pro", 1573.0), ("granite-3.1-1b-a400m", 1.33), ("qwen3.5-35b-a3b", 34.66)]
TRANSFORMERS_COUNTS += [("jamba-1.5-mini", 51.57)]


@pytest.mark.parametrize("name,figure,key", PUBLISHED)
def test_published_parameter_counts(name, figure, key):
    """Within 1%, or within the rounding of the published figure where that is coarser ("17" means 16.5-17.5).
    Some publishers truncate: DeepSeek-V3's "37B active" is 37.55B with embeddings and head (36.63B + the 0.93B
    embedding), Qwen3-30B-A3B's "3.3B" is 3.35B, DeepSeek-V2-Lite's "2.4B" is 2.45B without the input embedding."""
    truncated = key.endswith("_truncated")
    count = model_stats(load_model_config(name)).params[key.removesuffix("_truncated")] / 1e9
    if figure.endswith("T"):  # trillions, as published ("1.6T": 1.55-1.65T)
        figure, count = figure[:-1], count / 1e3
    if truncated:
        decimals = len(figure.split(".")[1]) if "." in figure else 0
        assert math.floor(count * 10**decimals) / 10**decimals == float(figure), (name, key, count)
        return
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    tolerance = max(0.01 * float(figure), 0.5 * 10**-decimals)
    assert abs(count - float(figure)) <= tolerance, (name, key, count)


@pytest.mark.parametrize("name,billions", TRANSFORMERS_COUNTS)
def test_counts_equal_transformers_count_of_published_configs(name, billions):
    assert round(model_stats(load_model_config(name)).params["total"] / 1e9, 2) == billions


def test_sliding_layers_keep_their_window():
    """MiMo-V2-Flash at 4096 tokens: its 39 sliding layers keep 129 tokens (the query and 128 before it)."""
    kv = plan("mimo-v2-flash", hardware="h200", gpus=8, context=4096)["kv_cache"]
    assert kv["bytes_per_sequence"] == (9 * 4 * 320 * 4096 + 39 * 8 * 320 * 129) * 2


def test_compressed_cache_grows_by_its_entries():
    """DeepSeek-V4-Flash at 65,536 tokens: every layer keeps 128 window rows of 512; its 21 CSA layers one 512-wide
    entry and one 128-wide indexer key per 4 tokens, its 20 HCA layers one entry per 128 tokens (bf16)."""
    kv = plan("deepseek-v4-flash", hardware="h200", gpus=8, context=65536)["kv_cache"]
    expected = 43 * 128 * 512 + 21 * (512 + 128) * (65536 // 4) + 20 * 512 * (65536 // 128)
    assert kv["bytes_per_sequence"] == expected * 2


def test_qwen_non_embedding_figure_is_truncated():
    """Qwen publishes 2.0B non-embedding active; the exact count is 2.07B (their figure truncates, not rounds)."""
    count = model_stats(load_model_config("qwen1.5-moe-a2.7b")).params["active_without_embeddings"] / 1e9
    assert math.floor(count * 10) / 10 == 2.0


# MLA caches the latent and the rope key per layer: Mistral Small 4 (256 + 64) x 36 layers x 2 bytes. MiMo-V2-Flash:
# 9 full layers x 4 KV heads and 39 sliding layers x 8, each head a 192-wide key and a 128-wide value, x 2 bytes.
KV_BYTES = [
    ("deepseek-v3", 70272),
    ("mixtral-8x7b", 131072),
    ("qwen3-30b-a3b", 98304),
    ("mistral-small-4-119b", 23040),
    ("mimo-v2-flash", 222720),
    ("deepseek-v3.2", 85888),  # (512 + 64 + the indexer's 128-wide key) x 61 layers x 2 bytes
]


@pytest.mark.parametrize("name,expected", KV_BYTES)
def test_published_kv_bytes_per_token(name, expected):
    assert plan(name, hardware="h200", gpus=16)["kv_cache"]["bytes_per_token"] == expected


@pytest.mark.parametrize("family", FAMILIES + list(WRAPPED))
def test_counts_equal_transformers_model(family):
    """One counting path, checked against the oracle: the parameters of transformers' own model of the config (of
    its language model and head, for a multimodal wrapper)."""
    cfg = tiny_config(family)
    model = hf_build(family, cfg)
    if family in WRAPPED:
        params = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    else:  # ERNIE 4.5 holds its selection bias as a frozen parameter; it is a buffer everywhere else
        params = [p for n, p in model.named_parameters() if not n.endswith("e_score_correction_bias")]
    stats = model_stats(model_from_hf(cfg.to_dict()))
    assert stats.params["total"] == sum(p.numel() for p in params)


def test_meta_count_equals_real_model():
    cfg = load_model_config("olmoe-1b-7b-0924")
    small = model_from_hf(
        {
            **json.loads(json.dumps(_hf("olmoe-1b-7b-0924"))),
            "hidden_size": 64,
            "num_experts": 8,
            "intermediate_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 100,
            "num_hidden_layers": 2,
        }
    )
    assert count_parameters(MoEDecoder(small)) == model_stats(small).params
    assert cfg.moe.num_experts == 64


def _hf(name):
    from moekit.config.published import load_hf_config

    return load_hf_config(name)


def test_mixtral_on_m2_max_matches_llama_cpp_measurement():
    """llama.cpp generated ~36.7 tok/s for Mixtral-8x7B Q4_0 on an M2 Max (400 GB/s): the ceiling lies above it and
    the typical figure (70% of peak bandwidth) within 30%."""
    d = plan("mixtral-8x7b", hardware="m2-max", weights="q4_0", context=512)["decode"]
    assert d["ceiling_tokens_per_s_per_sequence"] > 36.7
    assert abs(d["tokens_per_s_per_sequence"] / 36.7 - 1) < 0.3


def test_distinct_experts():
    assert distinct_experts(256, 8, 1) == pytest.approx(8)
    assert distinct_experts(8, 2, 1000) == pytest.approx(8)
    torch.manual_seed(0)
    picks = torch.rand(4000, 16, 64).argsort(-1)[..., :6]  # 4000 trials of 16 tokens choosing 6 of 64
    touched = torch.zeros(4000, 64).scatter_(1, picks.flatten(1), 1).sum(1).mean()
    assert float(touched) == pytest.approx(distinct_experts(64, 6, 16), rel=0.01)


def test_more_sequences_more_bytes_and_throughput():
    one = plan("qwen3-30b-a3b", hardware="h100-sxm", concurrency=1)["decode"]
    many = plan("qwen3-30b-a3b", hardware="h100-sxm", concurrency=64)["decode"]
    assert many["bytes_per_step"] > one["bytes_per_step"]
    assert many["distinct_experts_per_layer"] > one["distinct_experts_per_layer"]
    assert many["aggregate_tokens_per_s"] > 5 * one["aggregate_tokens_per_s"]


def test_mixed_precision_weights():
    full = plan("gpt-oss-20b", hardware="h100-sxm", weights="bf16")["weights"]["bytes"]
    mixed = plan("gpt-oss-20b", hardware="h100-sxm", weights="experts=mxfp4,rest=bf16")["weights"]["bytes"]
    assert mixed["rest"] == full["rest"]
    assert mixed["experts"] == pytest.approx(full["experts"] * 4.25 / 16, rel=1e-6)


def test_smallest_fit_and_multi_node():
    r = plan("deepseek-v3", hardware="h100-sxm", weights="fp8")
    assert r["gpus"]["count"] == 16 and r["gpus"]["nodes"] == 2 and r["cost"]["profile"] == "multi-node"
    assert r["decode"]["communication"]["link"].startswith("network")
    assert plan("olmoe-1b-7b-0924", hardware="h100-sxm")["cost"]["profile"] == "single GPU"


def test_recommendation_and_api_break_even():
    r = plan("qwen3-30b-a3b", concurrency=16, api_usd_per_mtok=0.3)
    assert r["recommendation"]["alternatives"]
    cost = r["cost"]
    assert cost["break_even_mtok_per_month"] == pytest.approx(cost["monthly_usd"] / 0.3)
    for alt in r["recommendation"]["alternatives"]:
        assert alt["usd_per_mtok_output"] >= cost["usd_per_mtok_output"]


def test_unknown_family_is_planned_from_common_fields():
    hf = {
        "model_type": "somemoe",
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "vocab_size": 1000,
        "num_experts": 16,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 256,
    }
    r = plan(hf, hardware="l4")
    assert r["model"]["assumptions"] and r["params"]["total"] > 0
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        plan({k: v for k, v in hf.items() if k != "num_experts_per_tok"}, hardware="l4")


def test_user_hardware_file(tmp_path):
    spec = tmp_path / "card.toml"
    spec.write_text(
        'name = "card"\nmemory_gb = 64\nbandwidth_gbs = 1000\nbf16_tflops = 200\n'
        "interconnect_gbs = 100\ngpus_per_node = 4\nusd_per_hour = 1.0\n"
    )
    r = plan("olmoe-1b-7b-0924", hardware=str(spec))
    assert r["gpus"]["hardware"] == "card" and r["cost"]["gpu_hour_usd"] == 1.0
    (tmp_path / "bad.json").write_text('{"name": "x", "memory": 3}')
    with pytest.raises(ValueError, match="unknown hardware fields memory"):
        plan("olmoe-1b-7b-0924", hardware=str(tmp_path / "bad.json"))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "no-such-model"], "deepseek-v3"),
        (["plan", "mixtral-8x7b", "--hardware", "tpu9"], "h100-sxm"),
        (["plan", "deepseek-v3", "--hardware", "l4", "--gpus", "8"], "smallest that fits is"),
        (["plan", "mixtral-8x7b", "--weights", "int3"], "weights='int3' is unknown"),
        (["plan", "mixtral-8x7b", "--context", "0"], "context=0"),
    ],
)
def test_plan_bad_input(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_plan_rejects_dense_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 100,
                "intermediate_size": 128,
            }
        )
    )
    assert main(["plan", str(tmp_path)]) == 2
    assert "num_local_experts" in capsys.readouterr().err


def test_plan_json_cli(capsys):
    assert main(["plan", "mixtral-8x7b", "--hardware", "h100-sxm", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("memory", "gpus", "decode", "cost"):
        assert key in r
    assert isinstance(r["params"]["total"], int) and isinstance(r["params"]["active_without_embeddings"], int)
    assert r["kv_cache"]["bytes_per_token"] == 131072


def test_inspect_json_and_directory(tmp_path, capsys):
    from moekit.config.published import load_hf_config

    (tmp_path / "config.json").write_text(json.dumps(load_hf_config("qwen3-30b-a3b")))
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["family"] == "qwen3_moe" and r["experts"] == 128 and r["top_k"] == 8
    assert r["kv_cache_bytes_per_token_bf16"] == 98304
    assert r["weight_bytes"]["bf16"] == 2 * r["params"]["total"]
    assert main(["inspect", "deepseek-v3"]) == 0
    assert "MLA" in capsys.readouterr().out


def test_python_api_equals_cli(capsys):
    import moekit

    assert main(["plan", "olmoe-1b-7b-0924", "--hardware", "l4", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    api = moekit.plan("olmoe-1b-7b-0924", hardware="l4")
    assert json.loads(json.dumps(api)) == cli


def test_weights_default_to_what_the_checkpoint_stores(tmp_path):
    """Without --weights the plan reads the precision from the quantization_config (a published name or config),
    or measures it from a directory's files (any mix, experts=auto included); --weights still decides."""
    from safetensors.torch import load_file

    from moekit.config.published import load_hf_config
    from moekit.quant.quantize import quantize_checkpoint

    r = plan("gpt-oss-20b", hardware="h100-sxm")
    assert r["weights"]["precision"] == "experts mxfp4, rest bf16"
    assert 13.5e9 < r["weights"]["bytes"]["total"] < 14.0e9  # the MXFP4 release's 13.76 GB of files
    # DeepSeek-V4-Flash: fp8 blocks, routed experts in 4-bit floats (expert_dtype)
    assert plan("deepseek-v4-flash", hardware="h200")["weights"]["precision"] == "experts mxfp4, rest fp8"
    kimi_like = load_hf_config("deepseek-v3") | {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "g": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True},
                }
            },
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*"],
        }
    }
    assert plan(kimi_like, hardware="h200", gpus=8)["weights"]["precision"] == "experts q4, rest bf16"
    assert plan("gpt-oss-20b", hardware="h100-sxm", weights="bf16")["weights"]["precision"] == "bf16"
    assert plan("mixtral-8x7b", hardware="h200")["weights"]["precision"] == "bf16"
    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    quantize_checkpoint(tmp_path / "hf", tmp_path / "q", "experts=q4,rest=q8")
    r = plan(str(tmp_path / "q"), hardware="h100-sxm")
    files = sum(
        t.numel() * t.element_size() for f in (tmp_path / "q").glob("*.safetensors") for t in load_file(f).values()
    )
    assert r["weights"]["precision"].startswith("as stored: experts 4.")
    assert abs(r["weights"]["bytes"]["total"] - files) / files < 1e-9
