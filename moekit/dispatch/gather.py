"""The row gathers of dispatch and combine, with backward passes that are gathers too.

Autograd's own backward of a row gather (index_select) is a scatter-add (atomic, so nondeterministic, on GPUs),
and of combine's per-token weighted sum (a batched matmul of [1, k] by [k, D]) one tiny product per token with its
operand copied first. When every token holds exactly k rows (a dense plan), each backward pass is again a gather
by an index the forward already has, a token's rows summed in slot order: deterministic, and one pass over the rows
in moekit's kernel (moekit.kernels.rows; torch's ops where the kernel does not take the tensors).

Indices: token_S[s] is the token of (expert-sorted) row s; slot_row_N[t * k + j] the row holding token t's slot j
(the inverse permutation of order_S, the assignment of each row)."""

from __future__ import annotations

import torch

from moekit.kernels.rows import row_grads, slot_sums


class _GatherTokens(torch.autograd.Function):
    """x_SD[s] = x_TD[token_S[s]]; the gradient of a token is the sum of its rows'."""

    @staticmethod
    def forward(ctx, x_TD, token_S, slot_row_N, num_slots):  # type: ignore[override]
        ctx.save_for_backward(slot_row_N)
        ctx.num_slots, ctx.dtype = num_slots, x_TD.dtype
        return x_TD.index_select(0, token_S)

    @staticmethod
    def backward(ctx, dx_SD):  # type: ignore[override]
        (slot_row_N,) = ctx.saved_tensors
        # under autocast the rows' gradient may come in another dtype than the tokens'
        return slot_sums(dx_SD, slot_row_N, None, ctx.num_slots).to(ctx.dtype), None, None, None


class _CombineSlots(torch.autograd.Function):
    """y_TD[t] = sum over slots j of weights_TK[t, j] (1 without weights) times token t's row of slot j."""

    @staticmethod
    def forward(ctx, y_SD, weights_TK, token_S, slot_row_N, order_S, num_slots):  # type: ignore[override]
        ctx.save_for_backward(y_SD, weights_TK, token_S, slot_row_N, order_S)
        ctx.weighted = weights_TK is not None
        return slot_sums(y_SD, slot_row_N, weights_TK, num_slots)

    @staticmethod
    def backward(ctx, dy_TD):  # type: ignore[override]
        y_SD, weights_TK, token_S, slot_row_N, order_S = ctx.saved_tensors
        dy_TD = dy_TD.to(y_SD.dtype)  # under autocast the gradient may come in another dtype than the rows'
        want_w, want_y = ctx.weighted and ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        # the rows' weights in row order scale the rows' gradient only
        w_S = weights_TK.reshape(-1).index_select(0, order_S) if ctx.weighted and want_y else None
        d_y, d_w_S = row_grads(dy_TD, token_S, y_SD if want_w else None, w_S, want_y)
        d_weights = d_w_S.index_select(0, slot_row_N).view_as(weights_TK) if want_w else None
        return d_y, d_weights, None, None, None, None


def gather_tokens(x_TD: torch.Tensor, token_S: torch.Tensor, slot_row_N: torch.Tensor, num_slots: int):
    """The rows of x_TD that go to the experts, every token num_slots times (a dense plan)."""
    return _GatherTokens.apply(x_TD, token_S, slot_row_N, num_slots)


def combine_slots(
    y_SD: torch.Tensor,
    weights_TK: torch.Tensor | None,
    token_S: torch.Tensor,
    slot_row_N: torch.Tensor,
    order_S: torch.Tensor,
    num_slots: int,
) -> torch.Tensor:
    """Each token's expert outputs summed in slot order, weighted by weights_TK unless None (a dense plan)."""
    return _CombineSlots.apply(y_SD, weights_TK, token_S, slot_row_N, order_S, num_slots)
