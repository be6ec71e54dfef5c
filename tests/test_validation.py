"""Bad input fails at once with a ValueError naming the field and the allowed range."""

import pytest
import torch

import moekit
from moekit import ExpertLayout, ModelConfig, MoEBlock, MoEConfig, RoutingSpec


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"num_experts": 4, "top_k": 0}, "top_k"),
        ({"num_experts": 8, "top_k": 2, "n_group": 4, "topk_group": 5}, "topk_group"),
        ({"num_experts": 8, "top_k": 2, "n_group": 3}, "n_group"),
        ({"num_experts": 8, "top_k": 6, "n_group": 4, "topk_group": 2}, "top_k"),
        ({"num_experts": 8, "top_k": 2, "score_func": "tanh"}, "score_func"),
        ({"num_experts": 8, "top_k": 2, "scaling_factor": -1.0}, "scaling_factor"),
        ({"num_experts": 8, "top_k": 2, "score_func": "sigmoid", "softmax_after_topk": True}, "softmax_after_topk"),
        ({"num_experts": 8, "top_k": 2, "normalize_eps": float("nan")}, "normalize_eps"),
    ],
)
def test_bad_routing_spec(kwargs, field):
    with pytest.raises(ValueError, match=field) as e:
        RoutingSpec(**kwargs)
    assert "allowed" in str(e.value)


SPEC = RoutingSpec(num_experts=4, top_k=2)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"bias_update_rate": 1e-3}, "bias_update_rate"),  # needs a selection bias
        ({"router": "random"}, "router"),
        ({"expert_hidden": 0}, "expert_hidden"),
        ({"backend": "nope"}, "backend"),
        ({"jitter": 2.0}, "jitter"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
    ],
)
def test_bad_moe_config(kwargs, field):
    base = {"routing": SPEC, "expert_hidden": 8}
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**base, **kwargs})


def test_bad_layout_and_model():
    with pytest.raises(ValueError, match="activation"):
        ExpertLayout(activation="swish2")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=3, moe=None, dense_hidden=8)
    with pytest.raises(ValueError, match="dense_hidden"):
        ModelConfig(
            hidden_size=64, num_layers=2, num_heads=4, moe=MoEConfig(routing=SPEC, expert_hidden=8), moe_layers=(1,)
        )


def test_bad_tensors():
    blk = MoEBlock(16, MoEConfig(routing=SPEC, expert_hidden=8))
    with pytest.raises(ValueError, match="shape"):
        blk(torch.randn(2, 3, 15))
    x = torch.randn(1, 3, 16)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        blk(x)
    model = moekit.from_config(
        ModelConfig(hidden_size=16, num_layers=1, num_heads=2, moe=MoEConfig(routing=SPEC, expert_hidden=8))
    )
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2]]), torch.ones(1, 3))


@pytest.mark.parametrize(
    "router,kwargs",
    [
        ("token_choice", {"slots_per_expert": 2}),
        ("expert_choice", {"aux_loss_coef": 0.01}),  # expert choice has no top-k for the Switch loss
        ("expert_choice", {"drop_policy": "score"}),
        ("soft", {"capacity_factor": 1.25}),
        ("soft", {"z_loss_coef": 1e-3}),  # soft MoE's plan has no router logits
        ("hash", {"jitter": 0.1}),
        ("hash", {"router_bias": True}),
    ],
)
def test_a_field_the_router_kind_does_not_read_is_refused(router, kwargs):
    (field,) = kwargs
    with pytest.raises(ValueError, match=rf"{field}=.* is invalid: allowed .* router='{router}' does not read it"):
        MoEConfig(routing=SPEC, expert_hidden=8, router=router, **kwargs)
    MoEConfig(routing=SPEC, expert_hidden=8, router=router)  # the defaults are fine
