"""Manifold-constrained hyper-connections (DeepSeek-V4): the residual is n parallel streams [B, T, n, D]. Before a
block, a learned projection of the (normed, flattened) streams gives three weightings: `pre` collapses the streams
into the block's input, `post` spreads the block's output back over them, and `comb`, made doubly stochastic by
Sinkhorn-Knopp iterations, mixes the streams themselves: streams = post * out + comb^T @ streams."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.kernels import kernel_taking
from moekit.layers.norm import unweighted_rms_norm


class HyperConnection(nn.Module):
    """fn [(2 + n) n, n D], base [(2 + n) n], scale [3] (pre, post, comb), all fp32."""

    def __init__(self, hidden_size: int, streams: int, sinkhorn_iters: int, eps: float, norm_eps: float):
        super().__init__()
        self.streams, self.iters, self.eps, self.norm_eps = streams, sinkhorn_iters, eps, norm_eps
        width = (2 + streams) * streams
        self.fn = nn.Parameter(torch.empty(width, streams * hidden_size))
        self.base = nn.Parameter(torch.zeros(width))
        self.scale = nn.Parameter(torch.ones(3))
        nn.init.normal_(self.fn, std=0.02)

    def forward(self, x_BTnD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(post [B, T, n], comb [B, T, n, n], the collapsed block input [B, T, D]); at inference on fp32 CPU tensors
        moekit's kernel computes the same in one call."""
        fused = self._kernel_weights(x_BTnD)
        if fused is not None:
            return fused
        n = self.streams
        flat = unweighted_rms_norm(x_BTnD.flatten(2).float(), self.norm_eps)
        mixes = F.linear(flat, self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):  # Sinkhorn-Knopp: rows and columns towards sums of one
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        collapsed_BTD = (pre.unsqueeze(-1) * x_BTnD).sum(dim=2).to(x_BTnD.dtype)
        return post, comb, collapsed_BTD

    def _kernel_weights(self, x_BTnD: torch.Tensor):
        params = (self.fn, self.base, self.scale)
        if torch.is_grad_enabled() or x_BTnD.dtype != torch.float32 or not x_BTnD.is_contiguous():
            return None
        kernel = kernel_taking(x_BTnD, *params)
        if kernel is None:
            return None
        b, t, n, d = x_BTnD.shape
        post, comb = x_BTnD.new_empty(b, t, n), x_BTnD.new_empty(b, t, n, n)
        collapsed = x_BTnD.new_empty(b, t, d)
        x_TnD = x_BTnD.view(b * t, n, d)
        kernel.hyper_weights(
            x_TnD, *params, self.iters, self.eps, self.norm_eps, post, comb, collapsed, torch.get_num_threads()
        )
        return post, comb, collapsed

    @staticmethod
    def mix(x_BTnD: torch.Tensor, out_BTD: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """The streams after a block: its output spread by post, plus the streams mixed by comb (transposed); at
        inference on fp32 CPU tensors in one kernel call."""
        dtype, parts = x_BTnD.dtype, (x_BTnD, out_BTD, post, comb)
        kernel = None if torch.is_grad_enabled() else kernel_taking(*parts)
        if kernel is not None and all(t.is_contiguous() for t in parts):
            b, t, n, d = x_BTnD.shape
            y_BTnD = torch.empty_like(x_BTnD)
            kernel.hyper_mix(x_BTnD.view(b * t, n, d), out_BTD, post, comb, y_BTnD, torch.get_num_threads())
            return y_BTnD
        return post.to(dtype).unsqueeze(-1) * out_BTD.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ x_BTnD


class HyperHead(nn.Module):
    """The last collapse of the streams before the final norm: hc_fn [n, n D], hc_base [n], hc_scale [1]."""

    def __init__(self, hidden_size: int, streams: int, eps: float, norm_eps: float):
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(streams, streams * hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(streams))
        self.hc_scale = nn.Parameter(torch.ones(1))
        nn.init.normal_(self.hc_fn, std=0.02)

    def forward(self, x_BTnD: torch.Tensor) -> torch.Tensor:
        flat = unweighted_rms_norm(x_BTnD.flatten(2).float(), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float())
        return ((pre + self.eps).unsqueeze(-1) * x_BTnD).sum(dim=2).to(x_BTnD.dtype)
