"""The decoder: forward/backward, padding, causality, placement, every router kind."""

import warnings

import pytest
import torch

import moekit
from moekit import ModelConfig, MoEConfig, RoutingSpec
from moekit.config import place_moe_layers
from moekit.config.published import published_names
from moekit.config.scaled import scaled_down
from moekit.model.count import count_parameters


def _cfg(router="token_choice", **moe_kw):
    spec = RoutingSpec(num_experts=8, top_k=2, normalize=True)
    moe = MoEConfig(routing=spec, expert_hidden=32, router=router, **moe_kw)
    return ModelConfig(
        hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, moe=moe, dense_hidden=96, moe_layers=(1, 2)
    )


def test_forward_backward_and_placement():
    model = moekit.from_config(_cfg(aux_loss_coef=0.01, num_shared_experts=1))
    assert list(model.moe_blocks()) == [1, 2]
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids, return_routing=True)
    assert out.logits.shape == (2, 12, 256) and set(out.moe) == {1, 2}
    loss = torch.nn.functional.cross_entropy(out.logits.view(-1, 256), ids.view(-1)) + out.aux_loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_left_padding_does_not_change_real_tokens():
    model = moekit.from_config(_cfg()).eval()
    ids = torch.randint(0, 256, (1, 10))
    ref = model(ids)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], 1).long()
    out = model(padded, mask)
    torch.testing.assert_close(out[:, 3:], ref, rtol=1e-4, atol=1e-5)


def test_logits_to_keep_gives_the_last_positions():
    model = moekit.from_config(_cfg()).eval()
    ids = torch.randint(0, 256, (2, 9))
    full = model(ids)
    torch.testing.assert_close(model(ids, logits_to_keep=1), full[:, -1:])
    torch.testing.assert_close(model(ids, logits_to_keep=4), full[:, -4:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


def test_token_choice_is_causal():
    model = moekit.from_config(_cfg()).eval()
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    torch.testing.assert_close(model(ids)[:, :10], model(changed)[:, :10])


def test_expert_choice_warns_and_leaks_future_tokens():
    with pytest.warns(UserWarning, match="breaks causality"):
        model = moekit.from_config(_cfg("expert_choice", capacity_factor=1.0)).eval()
    ids = torch.randint(0, 256, (1, 32))
    changed = ids.clone()
    changed[0, 16:] = (changed[0, 16:] + 7) % 256
    # the future changed which earlier tokens the experts picked: earlier logits move
    assert not torch.allclose(model(ids)[:, :16], model(changed)[:, :16])


def test_soft_moe_and_hash_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        soft = moekit.from_config(_cfg("soft", slots_per_expert=2))
    ids = torch.randint(0, 256, (2, 8))
    out = soft(ids, return_routing=True)
    assert out.logits.shape == (2, 8, 256)
    out.logits.sum().backward()
    hashed = moekit.from_config(_cfg("hash"))
    out = hashed(ids, return_routing=True)
    assert sum(int(i.tokens_per_expert_E.sum()) for i in out.moe.values()) == 2 * 16 * 2


def test_place_moe_layers():
    assert place_moe_layers(6, first_dense=2) == (2, 3, 4, 5)
    assert place_moe_layers(6, step=2) == (1, 3, 5)
    assert place_moe_layers(4, dense_layers=(0, 3)) == (1, 2)


@pytest.mark.parametrize("name", published_names())
def test_scaled_down_published_models_run(name):
    cfg = scaled_down(name, hidden_size=64, num_layers=2, num_heads=4, max_experts=16)
    model = moekit.from_config(cfg)
    out = model(torch.randint(0, 256, (1, 8)), return_routing=True)
    assert out.logits.shape == (1, 8, 256) and out.moe


def test_parameter_counts():
    model = moekit.from_config(_cfg())
    c = count_parameters(model)
    assert c["total"] == sum(p.numel() for p in model.parameters())
    one_layer = 8 * (2 * 32 * 64 + 64 * 32)
    assert c["routed_experts"] == 2 * one_layer
    assert c["total"] - c["active"] == 2 * one_layer * 6 // 8
