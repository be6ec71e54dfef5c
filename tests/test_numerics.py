"""Numerics the other tests leave out: gradient accumulation equals the whole batch, bf16 (the router in the model's
dtype, autocast training) stays close to fp32, and the loss-free balancer's all-reduce under torch.distributed (a
one-rank gloo group) applies the update one process applies."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moekit import MoEBlock, MoEConfig, RoutingSpec
from moekit.routing import LossFreeBalancer
from moekit.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import SMALL_TOML  # noqa: E402

from moekit.train.config import load_run_config  # noqa: E402

NO_AUX = SMALL_TOML.replace(
    "[model.moe]\n", "[model.moe]\naux_loss_coef = 0.0\nseq_aux_loss_coef = 0.0\nz_loss_coef = 0.0\n"
)


def _trainer(tmp_path: Path, name: str, **flags) -> Trainer:
    (tmp_path / "cfg.toml").write_text(NO_AUX)
    model_cfg, train_cfg = load_run_config(tmp_path / "cfg.toml", overrides=flags)
    trainer = Trainer(model_cfg, train_cfg, tmp_path / name, progress=False)
    trainer.start()
    return trainer


def _grads_of_first_step(trainer: Trainer, monkeypatch) -> dict[str, torch.Tensor]:
    seen = {}
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, *args, **kw):
        params = list(params)
        seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return clip(params, *args, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    trainer.train_step()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return seen


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, monkeypatch):
    accumulated = _trainer(tmp_path, "accumulated", batch_size=2, grad_accum=2)
    whole = _trainer(tmp_path, "whole", batch_size=4, grad_accum=1)
    micro = [accumulated.train_stream.batch(2, accumulated.cfg.seed, 0, m) for m in (0, 1)]
    monkeypatch.setattr(whole.train_stream, "batch", lambda *args: torch.cat(micro))
    assert all(torch.equal(a, b) for a, b in zip(accumulated.model.parameters(), whole.model.parameters(), strict=True))
    grads_a = _grads_of_first_step(accumulated, monkeypatch)
    grads_w = _grads_of_first_step(whole, monkeypatch)
    assert grads_a.keys() == grads_w.keys() and grads_a
    assert max(_rel(grads_a[n], grads_w[n]) for n in grads_a) < 1e-5
    biases = [
        (a.selection_bias_E, w.selection_bias_E)
        for a, w in zip(accumulated.model.routers(), whole.model.routers(), strict=True)
    ]
    assert biases and all(torch.equal(a, w) for a, w in biases)  # counts over both micro-batches, one update
    assert any(a.abs().sum() > 0 for a, _ in biases)


def test_autocast_bf16_training_step_stays_close_to_fp32(tmp_path, monkeypatch):
    fp32 = _trainer(tmp_path, "fp32", dtype="float32")
    bf16 = _trainer(tmp_path, "bf16", dtype="bfloat16")
    g32, g16 = _grads_of_first_step(fp32, monkeypatch), _grads_of_first_step(bf16, monkeypatch)
    flat32 = torch.cat([g32[n].flatten() for n in g32])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    assert float(torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)) > 0.99
    assert all(g.dtype == torch.float32 for g in g16.values())  # the weights and their gradients stay fp32
    loss32 = [r for r in [fp32.train_step()]][0]["loss"]
    loss16 = [r for r in [bf16.train_step()]][0]["loss"]
    assert abs(loss32 - loss16) / loss32 < 1e-2


def test_router_in_the_models_dtype_under_bf16():
    """DBRX routes in the activations' dtype (router_dtype='model'): a bf16 block stays within bf16's precision of
    the same block in fp32, and its router logits really are bf16."""
    torch.manual_seed(0)
    spec = RoutingSpec(num_experts=8, top_k=2, normalize=True, router_dtype="model")
    block32 = MoEBlock(64, MoEConfig(routing=spec, expert_hidden=32)).eval()
    block16 = MoEBlock(64, MoEConfig(routing=spec, expert_hidden=32)).eval()
    block16.load_state_dict(block32.state_dict())
    block16.to(torch.bfloat16)
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        y32, info32 = block32(x)
        y16, info16 = block16(x.bfloat16())
        assert block16.router.logits(x.view(-1, 64).bfloat16()).dtype == torch.bfloat16
    assert y16.dtype == torch.bfloat16
    agree = (info32.topk_ids_TK.sort(-1).values == info16.topk_ids_TK.sort(-1).values).all(-1).float().mean()
    assert agree > 0.8  # near-ties may flip in bf16
    same_T = (info32.topk_ids_TK.sort(-1).values == info16.topk_ids_TK.sort(-1).values).all(-1)
    assert _rel(y16.float().view(-1, 64)[same_T], y32.view(-1, 64)[same_T]) < 2e-2


def test_balancer_all_reduces_under_torch_distributed(tmp_path):
    spec = RoutingSpec(num_experts=4, top_k=1, score_func="sigmoid", selection_bias=True)
    cfg = MoEConfig(routing=spec, expert_hidden=8, bias_update_rate=0.1)
    alone, ranked = MoEBlock(8, cfg), MoEBlock(8, cfg)
    for block in (alone, ranked):
        block.router.load_E.copy_(torch.tensor([5.0, 1.0, 0.0, 2.0]))
    LossFreeBalancer([alone.router], rate=0.1).step()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        LossFreeBalancer([ranked.router], rate=0.1).step()
    finally:
        dist.destroy_process_group()
    assert torch.equal(ranked.router.selection_bias_E, alone.router.selection_bias_E)
    expected = torch.tensor([-0.1, 0.1, 0.1, 0.0])  # u * sign(mean 2 - load)
    torch.testing.assert_close(alone.router.selection_bias_E, expected)
    assert ranked.router.load_E.sum() == 0  # counts reset after the step
