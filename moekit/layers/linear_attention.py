"""Gated DeltaNet, the linear attention of Qwen3-Next and Qwen3.5: a recurrent state per sequence and head instead of
a cache that grows per token.

Per token t and value head h, with the key k_t and query q_t L2-normalised (q_t also scaled by 1/sqrt(d_k)):
    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S^T_{t-1,decayed} k_t))^T,   o_t = S_t^T q_t
where g_t = -exp(A_log) softplus(a_t + dt_bias) <= 0 is the decay and beta_t = sigmoid(b_t) the write strength (the
delta rule: only what the decayed state does not already predict is written). q, k and v first pass a short causal
depthwise convolution (kernel linear_conv) with SiLU; the output is RMS-normed per head, gated by SiLU(z) and
projected out.

Two ways to compute it, equal to float rounding: the recurrence token by token (decode, and the reference) and the
chunked form (prefill and training: within a chunk of CHUNK tokens the updates are one triangular solve and a few
matmuls, across chunks the state is carried), as in the DeltaNet papers and flash-linear-attention. With a cache
the layer keeps (conv state [B, C, kernel - 1], recurrent state [B, H_v, d_k, d_v]) and continues from them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config.model import ModelConfig
from moekit.layers.linear import Linear
from moekit.layers.norm import unweighted_rms_norm
from moekit.layers.recurrent import recurrent_inputs, short_conv

CHUNK = 64  # tokens per chunk of the chunked form (flash-linear-attention's and transformers' choice)


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def recurrent_delta_rule(
    q_BHTk: torch.Tensor,
    k_BHTk: torch.Tensor,
    v_BHTv: torch.Tensor,
    g_BHT: torch.Tensor,
    beta_BHT: torch.Tensor,
    state_BHkv: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token (fp32; q already normalised and scaled): (outputs [B, H, T, d_v], the
    state after the last token)."""
    out = torch.empty_like(v_BHTv)
    for t in range(q_BHTk.shape[2]):
        state_BHkv = state_BHkv * g_BHT[:, :, t].exp()[..., None, None]
        k_BHk = k_BHTk[:, :, t]
        predicted_BHv = (state_BHkv * k_BHk.unsqueeze(-1)).sum(-2)
        delta_BHv = (v_BHTv[:, :, t] - predicted_BHv) * beta_BHT[:, :, t].unsqueeze(-1)
        state_BHkv = state_BHkv + k_BHk.unsqueeze(-1) * delta_BHv.unsqueeze(-2)
        out[:, :, t] = (state_BHkv * q_BHTk[:, :, t].unsqueeze(-1)).sum(-2)
    return out, state_BHkv


def chunked_delta_rule(
    q_BHTk: torch.Tensor,
    k_BHTk: torch.Tensor,
    v_BHTv: torch.Tensor,
    g_BHT: torch.Tensor,
    beta_BHT: torch.Tensor,
    state_BHkv: torch.Tensor,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as recurrent_delta_rule, CHUNK tokens at a time. Within a chunk, with cumulative log-decays c_i, the
    writes solve (I + tril(diag(beta) K K^T * exp(c_i - c_j), -1)) U = diag(beta) V (the WY form of the delta rule's
    product of Householder-like updates); outputs read the carried state plus the chunk's own causal part."""
    b, h, t, dk = k_BHTk.shape
    pad = (chunk - t % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q_BHTk, k_BHTk, v_BHTv))
    g, beta = (F.pad(x, (0, pad)) for x in (g_BHT, beta_BHT))
    n = (t + pad) // chunk
    q, k, v = (x.reshape(b, h, n, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(b, h, n, chunk), beta.reshape(b, h, n, chunk)
    k_beta, v_beta = k * beta.unsqueeze(-1), v * beta.unsqueeze(-1)
    decay = g.cumsum(-1)  # [B, H, N, C]: log of the decay from the chunk's start through each token
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pair = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(future, float("-inf")).exp()  # [.., i, j]
    system = (k_beta @ k.transpose(-1, -2)) * pair  # its strict lower part; the solve takes the diagonal as 1
    solve = torch.linalg.solve_triangular
    values = solve(system, v_beta, upper=False, unitriangular=True)
    decayed_keys = solve(system, k_beta * decay.exp().unsqueeze(-1), upper=False, unitriangular=True)
    within = (q @ k.transpose(-1, -2)) * pair
    q_read = q * decay.exp().unsqueeze(-1)
    k_write = k * (decay[..., -1:] - decay).exp().unsqueeze(-1)
    chunk_decay = decay[..., -1].exp()[..., None, None]
    out = torch.empty_like(v)
    for i in range(n):
        fresh = values[:, :, i] - decayed_keys[:, :, i] @ state_BHkv
        out[:, :, i] = q_read[:, :, i] @ state_BHkv + within[:, :, i] @ fresh
        state_BHkv = state_BHkv * chunk_decay[:, :, i] + k_write[:, :, i].transpose(-1, -2) @ fresh
    return out.reshape(b, h, n * chunk, -1)[:, :, :t], state_BHkv


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output times SiLU of its gate (plain weight, not stored as an offset)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = unweighted_rms_norm(x.float(), self.eps).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """One linear-attention layer. Parameters under the checkpoints' names: grouped projections (Qwen3-Next)
    in_proj_qkvz (per key head: q, k, then its value heads' v and z) and in_proj_ba (per key head: its value heads'
    b, then a), or split ones (Qwen3.5) in_proj_qkv (all q, all k, all v), in_proj_z, in_proj_b, in_proj_a; conv1d,
    dt_bias, A_log, norm, out_proj."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        a, d = cfg.attention, cfg.hidden_size
        self.layer, self.layer_type = layer, "linear"
        self.key_heads, self.value_heads = a.linear_key_heads, a.linear_value_heads
        self.key_dim, self.value_dim = a.linear_key_dim, a.linear_value_dim
        self.kernel = a.linear_conv
        keys, values = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        self.conv_dim = 2 * keys + values
        self.grouped = a.linear_projection == "grouped"
        if self.grouped:
            self.in_proj_qkvz = Linear(d, 2 * keys + 2 * values, bias=False)
            self.in_proj_ba = Linear(d, 2 * self.value_heads, bias=False)
        else:
            self.in_proj_qkv = Linear(d, 2 * keys + values, bias=False)
            self.in_proj_z = Linear(d, values, bias=False)
            self.in_proj_b = Linear(d, self.value_heads, bias=False)
            self.in_proj_a = Linear(d, self.value_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.value_heads))
        self.A_log = nn.Parameter(torch.zeros(self.value_heads))
        self.norm = GatedRMSNorm(self.value_dim, cfg.norm_eps)
        self.out_proj = Linear(values, d, bias=False)

    def _split(self, x_BTD: torch.Tensor):
        """q, k [B, T, Hk, dk]; v, z [B, T, Hv, dv]; b, a [B, T, Hv] from the projections."""
        b_, t, _ = x_BTD.shape
        if not self.grouped:
            keys = self.key_heads * self.key_dim
            q, k, v = self.in_proj_qkv(x_BTD).split([keys, keys, self.value_heads * self.value_dim], dim=-1)
            shape_v = (b_, t, self.value_heads, self.value_dim)
            key_shape = (b_, t, self.key_heads, self.key_dim)
            z = self.in_proj_z(x_BTD).view(shape_v)
            return (
                q.view(key_shape),
                k.view(key_shape),
                v.reshape(shape_v),
                z,
                self.in_proj_b(x_BTD),
                self.in_proj_a(x_BTD),
            )
        per = self.value_heads // self.key_heads
        qkvz = self.in_proj_qkvz(x_BTD).view(b_, t, self.key_heads, -1)
        q, k, v, z = qkvz.split([self.key_dim, self.key_dim, per * self.value_dim, per * self.value_dim], dim=-1)
        ba = self.in_proj_ba(x_BTD).view(b_, t, self.key_heads, 2 * per)
        beta_in, decay_in = ba.split([per, per], dim=-1)
        shape_v = (b_, t, self.value_heads, self.value_dim)
        heads = (b_, t, self.value_heads)
        return q, k, v.reshape(shape_v), z.reshape(shape_v), beta_in.reshape(heads), decay_in.reshape(heads)

    def forward(self, x_BTD: torch.Tensor, inputs) -> torch.Tensor:
        cache = inputs.cache
        b_, t, _ = x_BTD.shape
        x_BTD, saved, _ = recurrent_inputs(inputs, self.layer, x_BTD)
        q, k, v, z, beta_in, decay_in = self._split(x_BTD)
        mixed_BCT = torch.cat([q.reshape(b_, t, -1), k.reshape(b_, t, -1), v.reshape(b_, t, -1)], -1).transpose(1, 2)
        conv_BCT, conv_state = short_conv(mixed_BCT, self.conv1d, saved)
        q, k, v = conv_BCT.transpose(1, 2).split([self.key_heads * self.key_dim] * 2 + [v.shape[2] * v.shape[3]], -1)
        per = self.value_heads // self.key_heads

        def heads(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:  # [B, T, n*dim] -> [B, Hv, T, dim] fp32
            x = x.reshape(b_, t, n, dim)
            if n != self.value_heads:
                x = x.repeat_interleave(per, dim=2)
            return x.transpose(1, 2).float()

        q = l2_normalise(heads(q, self.key_heads, self.key_dim)) * self.key_dim**-0.5
        k = l2_normalise(heads(k, self.key_heads, self.key_dim))
        v = heads(v, self.value_heads, self.value_dim)
        beta = beta_in.sigmoid().transpose(1, 2).float()
        g = (-self.A_log.float().exp() * F.softplus(decay_in.float() + self.dt_bias)).transpose(1, 2)
        state = saved[1] if saved is not None else v.new_zeros(b_, self.value_heads, self.key_dim, self.value_dim)
        rule = recurrent_delta_rule if t == 1 else chunked_delta_rule
        out_BHTv, state = rule(q, k, v, g, beta, state)
        if cache is not None:
            cache.set_state(self.layer, conv_state, state)
        out_BTHv = out_BHTv.transpose(1, 2).to(x_BTD.dtype)
        out_BTHv = self.norm(out_BTHv, z)
        return self.out_proj(out_BTHv.reshape(b_, t, -1))
