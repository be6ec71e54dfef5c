"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the indexer really prunes (logits differ from dense MLA once a
prompt outgrows index_topk, and equal it below), cached decoding equals a full forward at every length across that
boundary, shared layers reuse the previous pick, and the indexer keys are counted in the cache."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moekit
from moekit.families import load_model_config
from moekit.infer.cache import KVCache
from moekit.model.decoder import MoEDecoder
from moekit.plan.model_stats import model_stats

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402

pytest.importorskip("transformers")


def _dense_twin(model: MoEDecoder) -> MoEDecoder:
    """The same weights with every key kept (index_topk beyond any prompt)."""
    cfg = model.config
    twin = MoEDecoder(replace(cfg, attention=replace(cfg.attention, index_topk=10_000)))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_indexer_prunes_past_index_topk_and_decode_matches(family, tmp_path):
    hf_tiny_model(family, tmp_path)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    topk = model.config.attention.index_topk
    ids = torch.randint(3, 96, (1, 14), generator=torch.Generator().manual_seed(2))
    dense = _dense_twin(model)
    with torch.no_grad():
        sparse_logits, dense_logits = model(ids), dense(ids)
    assert torch.allclose(sparse_logits[0, :topk], dense_logits[0, :topk], atol=1e-6)  # every key fits
    assert (sparse_logits[0, topk:] - dense_logits[0, topk:]).abs().max() > 1e-3  # keys pruned

    cache, steps = KVCache(), []
    with torch.no_grad():
        steps.append(model(ids[:, :3], cache=cache)[:, -1])
        for i in range(3, ids.shape[1]):  # one token at a time across index_topk
            steps.append(model(ids[:, i : i + 1], cache=cache)[:, -1])
    full = torch.stack([sparse_logits[0, i] for i in range(2, ids.shape[1])])
    assert float((torch.cat(steps) - full).norm() / full.norm()) < 1e-5
    # the indexer's keys are cached beside MLA's latent and rope key (shared layers have none)
    indexed = [i for i, layer in enumerate(model.layers) if layer.self_attn.indexer is not None]
    assert [len(cache.room(i, 0)) for i in range(len(model.layers))] == [3 if i in indexed else 2 for i in range(4)]


def test_shared_layers_have_no_indexer_and_reuse_the_pick(tmp_path):
    hf = hf_tiny_model("glm_moe_dsa", tmp_path)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.attention.index_shared_layers == (2,)
    assert model.layers[2].self_attn.indexer is None and model.layers[1].self_attn.indexer is not None
    assert not any("layers.2.self_attn.indexer" in n for n, _ in hf.named_parameters())


def test_index_scores_do_not_tie(tmp_path):
    """torch.topk breaks ties differently for different lengths: the tiny indexer (16 heads) must not tie."""
    hf_tiny_model("deepseek_v32", tmp_path)
    model = moekit.from_pretrained(tmp_path, dtype=torch.float32)
    attn = model.layers[1].self_attn
    x = torch.randn(1, 14, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    inputs = model.attention_inputs(torch.arange(14)[None], None, 14, 14, torch.float32)
    with torch.no_grad():
        _, q_low = attn.queries(x)
        keys = attn.indexer.keys(x, inputs.rope)
        q = attn.indexer.wq_b(q_low).view(1, 14, -1, attn.indexer.head_dim).transpose(1, 2)
        q = attn.indexer._rope(q, inputs.rope)
        scores = torch.relu(q @ keys.unsqueeze(1).transpose(-1, -2))
        index = (attn.indexer.weights_proj(x).unsqueeze(-2) @ scores.transpose(1, 2)).squeeze(-2)[0]
    for t in range(attn.indexer.topk, 14):
        row = index[t, : t + 1].sort(descending=True).values
        assert (row[attn.indexer.topk - 1] - row[attn.indexer.topk]).abs() > 1e-6


def test_cache_bytes_count_the_indexer_keys():
    cfg = load_model_config("deepseek-v3.2")
    a = cfg.attention
    per_layer = a.kv_lora_rank + a.qk_rope_head_dim + a.index_head_dim
    assert model_stats(cfg).kv_bytes_per_token(2) == per_layer * cfg.num_layers * 2
