"""Dispatch's and combine's row gathers (moekit.dispatch.gather): moekit's kernel and torch's fallback against
plain autograd over index_select, outputs and every gradient."""

import pytest
import torch

from moekit import kernels
from moekit.dispatch import gather

# 2048 rows of 512 fp32: exactly kernels.MIN_KERNEL_BYTES, the smallest the kernel takes
TOKENS, SLOTS, HIDDEN = 512, 4, 512


def _indices(tokens: int, slots: int, seed: int = 0):
    """A dense plan's rows sorted by a random expert: (order_S, token_S, row_N)."""
    g = torch.Generator().manual_seed(seed)
    experts_N = torch.randint(0, 7, (tokens * slots,), generator=g)
    order_S = torch.argsort(experts_N, stable=True)
    row_N = torch.empty_like(order_S)
    row_N[order_S] = torch.arange(order_S.numel())
    return order_S, order_S // slots, row_N


def _reference_combine(y_SD, weights_TK, order_S):
    """An explicit weighted sum over each token's assignments, with autograd's own backward."""
    y_ND = torch.empty_like(y_SD).index_copy(0, order_S, y_SD)  # assignment order: token t's slots at t*k..
    y_TKD = y_ND.view(weights_TK.shape[0], weights_TK.shape[1], -1)
    return (y_TKD * weights_TK.unsqueeze(-1)).sum(1)


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    if request.param == "kernel" and not kernels.kernel_available():
        pytest.skip("no C++ compiler: torch's path only")
    if request.param == "torch":
        monkeypatch.setattr(kernels.rows, "kernel_for", lambda *args: None)
    return request.param


@pytest.mark.parametrize("weighted", [True, False])
def test_gathers_match_autograd(path, weighted):
    order_S, token_S, row_N = _indices(TOKENS, SLOTS)
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(TOKENS, HIDDEN, generator=g, requires_grad=True)
    y_SD = torch.randn(TOKENS * SLOTS, HIDDEN, generator=g, requires_grad=True)
    w_TK = torch.rand(TOKENS, SLOTS, generator=g, requires_grad=True)
    dx_SD, dy_TD = torch.randn(TOKENS * SLOTS, HIDDEN, generator=g), torch.randn(TOKENS, HIDDEN, generator=g)

    x_SD = gather.gather_tokens(x_TD, token_S, row_N, SLOTS)
    out_TD = gather.combine_slots(y_SD, w_TK if weighted else None, token_S, row_N, order_S, SLOTS)
    ref_x_SD = x_TD.index_select(0, token_S)
    ref_out_TD = _reference_combine(y_SD, w_TK if weighted else torch.ones_like(w_TK), order_S)
    torch.testing.assert_close(x_SD, ref_x_SD, rtol=0, atol=0)
    torch.testing.assert_close(out_TD, ref_out_TD, rtol=1e-5, atol=1e-5)

    inputs = [x_TD, y_SD, w_TK] if weighted else [x_TD, y_SD]
    grads = torch.autograd.grad([x_SD, out_TD], inputs, [dx_SD, dy_TD])
    ref_grads = torch.autograd.grad([ref_x_SD, ref_out_TD], inputs, [dx_SD, dy_TD])
    for name, got, want in zip(["x", "y", "weights"], grads, ref_grads, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=f"{path}: gradient of {name}")


def test_combine_weights_only_gradient(path):
    """Experts frozen (no gradient for their outputs): the weights' gradient alone, and no rows written."""
    order_S, token_S, row_N = _indices(TOKENS, SLOTS, seed=2)
    y_SD = torch.randn(TOKENS * SLOTS, HIDDEN)
    w_TK = torch.rand(TOKENS, SLOTS, requires_grad=True)
    dy_TD = torch.randn(TOKENS, HIDDEN)
    (got,) = torch.autograd.grad(gather.combine_slots(y_SD, w_TK, token_S, row_N, order_S, SLOTS), w_TK, dy_TD)
    (want,) = torch.autograd.grad(_reference_combine(y_SD, w_TK, order_S), w_TK, dy_TD)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_combine_is_deterministic(path):
    order_S, token_S, row_N = _indices(TOKENS, SLOTS, seed=3)
    y_SD = torch.randn(TOKENS * SLOTS, HIDDEN, requires_grad=True)
    w_TK = torch.rand(TOKENS, SLOTS, requires_grad=True)
    dy_TD = torch.randn(TOKENS, HIDDEN)
    runs = [
        torch.autograd.grad(gather.combine_slots(y_SD, w_TK, token_S, row_N, order_S, SLOTS), [y_SD, w_TK], dy_TD)
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
