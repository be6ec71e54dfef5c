"""The row gathers and weighted slot sums of dispatch and combine in one pass over the rows (csrc/rows.cpp), torch's
ops where the kernel does not take the tensors (GPUs, other dtypes, small batches, no compiler).

Indices: token_S[s] is the token of (expert-sorted) row s; slot_row_N[t * k + j] the row holding token t's slot j."""

from __future__ import annotations

import torch

from moekit.kernels.build import kernel_for


def _kernel(num_rows: int, *tensors: torch.Tensor):
    """moekit's kernel when it takes these contiguous tensors (the first has rows as long as the expert rows') and
    num_rows such rows are worth it; else None."""
    if not all(t.is_contiguous() for t in tensors):
        return None
    return kernel_for(num_rows * tensors[0].shape[-1] * tensors[0].element_size(), *tensors)


def slot_sums(rows_SD: torch.Tensor, slot_row_N: torch.Tensor, weights_TK: torch.Tensor | None, num_slots: int):
    """out[t] = sum over slots j, in order, of weights_TK[t, j] (1 if None) times token t's row of slot j."""
    rows_SD = rows_SD.contiguous()
    weights = () if weights_TK is None else (weights_TK,)
    kernel = _kernel(rows_SD.shape[0], rows_SD, *weights)
    if kernel is not None:
        out_TD = rows_SD.new_empty(slot_row_N.numel() // num_slots, rows_SD.shape[-1])
        w = weights_TK if weights_TK is not None else rows_SD.new_empty(0)
        kernel.slot_sums(rows_SD, slot_row_N, w, out_TD, num_slots, torch.get_num_threads())
        return out_TD
    rows_TKD = rows_SD.index_select(0, slot_row_N).view(-1, num_slots, rows_SD.shape[-1])
    if weights_TK is None:
        return rows_TKD.sum(1)
    return torch.bmm(weights_TK.unsqueeze(1), rows_TKD).squeeze(1)


def row_grads(
    grad_TD: torch.Tensor,
    token_S: torch.Tensor,
    rows_SD: torch.Tensor | None,
    w_S: torch.Tensor | None,
    need_rows: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d_rows_SD, d_w_S): each row's share w_S[s] * grad_TD[token_S[s]] (w_S None: 1; None unless need_rows) and,
    given rows_SD, dot(grad_TD[token_S[s]], rows_SD[s]) (else None)."""
    grad_TD = grad_TD.contiguous()
    optional = tuple(t for t in (rows_SD, w_S) if t is not None)
    kernel = _kernel(token_S.numel(), grad_TD, *optional)
    if kernel is not None:
        empty = grad_TD.new_empty(0)
        d_rows = grad_TD.new_empty(token_S.numel(), grad_TD.shape[-1]) if need_rows else None
        d_w = grad_TD.new_empty(token_S.numel()) if rows_SD is not None else None
        kernel.row_grads(
            grad_TD,
            token_S,
            rows_SD.contiguous() if rows_SD is not None else empty,
            w_S.contiguous() if w_S is not None else empty,
            d_rows if d_rows is not None else empty,
            d_w if d_w is not None else empty,
            torch.get_num_threads(),
        )
        return d_rows, d_w
    grad_SD = grad_TD.index_select(0, token_S)
    d_w = torch.linalg.vecdot(grad_SD, rows_SD) if rows_SD is not None else None
    if not need_rows:
        return None, d_w
    return (grad_SD if w_S is None else grad_SD.mul_(w_S.unsqueeze(-1))), d_w
