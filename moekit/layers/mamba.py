"""Mamba-1's selective state-space layer as Jamba has it: a recurrent state per sequence and channel instead of a
cache that grows per token.

x, gate = in_proj(h); x passes a short causal depthwise convolution (with bias) and SiLU; dt, B, C = x_proj(x) with
RMSNorms on each (Jamba's addition); per channel c and state dimension n, with dt = softplus(dt_proj(dt)) and
A = -exp(A_log):
    s_t[c, n] = exp(dt_t[c] A[c, n]) s_{t-1}[c, n] + dt_t[c] B_t[n] x_t[c]
    y_t[c] = sum_n s_t[c, n] C_t[n] + D[c] x_t[c]
and the output is out_proj(y * SiLU(gate)). The scan runs token by token (what transformers' reference does without
its compiled kernels); with a cache the layer keeps (conv state [B, I, kernel - 1], scan state [B, I, N])."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config.model import ModelConfig
from moekit.layers.linear import Linear
from moekit.layers.norm import RMSNorm, unweighted_rms_norm
from moekit.layers.recurrent import recurrent_inputs, short_conv


def selective_scan(
    x_BIT: torch.Tensor,
    dt_BIT: torch.Tensor,
    A_IN: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    state_BIN: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan token by token from state_BIN (fp32): (y [B, I, T] before the D skip, the last state)."""
    decay_BITN = torch.exp(A_IN[None, :, None, :] * dt_BIT[..., None])
    write_BITN = dt_BIT[..., None] * B_BTN[:, None, :, :] * x_BIT[..., None]
    out = []
    for t in range(x_BIT.shape[2]):
        state_BIN = decay_BITN[:, :, t] * state_BIN + write_BITN[:, :, t]
        out.append(torch.matmul(state_BIN, C_BTN[:, t, :, None])[..., 0])
    return torch.stack(out, dim=-1), state_BIN


class MambaMixer(nn.Module):
    """Parameters under Jamba's names: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj and the dt / B / C
    RMSNorms."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        a, d = cfg.attention, cfg.hidden_size
        self.layer, self.layer_type = layer, "mamba"
        self.inner, self.state, self.rank, self.kernel = (
            a.mamba_expand * d,
            a.mamba_state,
            a.mamba_dt_rank,
            a.mamba_conv,
        )
        self.in_proj = Linear(d, 2 * self.inner, bias=a.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.inner, self.inner, self.kernel, groups=self.inner, bias=a.mamba_conv_bias)
        self.x_proj = Linear(self.inner, self.rank + 2 * self.state, bias=False)
        self.dt_proj = Linear(self.rank, self.inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(self.inner, self.state))
        self.D = nn.Parameter(torch.ones(self.inner))
        self.out_proj = Linear(self.inner, d, bias=a.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.rank, cfg.norm_eps)
        self.b_layernorm = RMSNorm(self.state, cfg.norm_eps)
        self.c_layernorm = RMSNorm(self.state, cfg.norm_eps)

    def forward(self, h_BTD: torch.Tensor, inputs) -> torch.Tensor:
        cache = inputs.cache
        b, t, _ = h_BTD.shape
        h_BTD, saved, mask_BT1 = recurrent_inputs(inputs, self.layer, h_BTD)
        x_BIT, gate_BIT = self.in_proj(h_BTD).transpose(1, 2).chunk(2, dim=1)
        x_BIT, conv_state = short_conv(x_BIT, self.conv1d, saved)
        x_BTI = x_BIT.transpose(1, 2)
        if mask_BT1 is not None:
            x_BTI = x_BTI * mask_BT1
        dt, B, C = self.x_proj(x_BTI).split([self.rank, self.state, self.state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        dt_BIT = F.softplus((self.dt_proj.weight @ dt.transpose(1, 2)).float() + self.dt_proj.bias.float()[:, None])
        A_IN = -torch.exp(self.A_log.float())
        state = saved[1] if saved is not None else x_BTI.new_zeros(b, self.inner, self.state, dtype=torch.float32)
        x32_BIT = x_BTI.transpose(1, 2).float()
        y_BIT, state = selective_scan(x32_BIT, dt_BIT, A_IN, B.float(), C.float(), state)
        if cache is not None:
            cache.set_state(self.layer, conv_state, state)
        y_BIT = (y_BIT + x32_BIT * self.D.float()[None, :, None]) * F.silu(gate_BIT.float())
        return self.out_proj(y_BIT.transpose(1, 2).to(h_BTD.dtype))


def ssd_scan(
    x_BTHP: torch.Tensor,
    dt_BTH: torch.Tensor,
    A_H: torch.Tensor,
    B_BTHN: torch.Tensor,
    C_BTHN: torch.Tensor,
    state_BHPN: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's scan token by token (fp32): one scalar decay per head, s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T,
    y_t = s_t C_t; (y [B, T, H, P] before the D skip, the last state [B, H, P, N])."""
    decay_BTH = torch.exp(dt_BTH * A_H)
    out = []
    for t in range(x_BTHP.shape[1]):
        write_BHPN = (dt_BTH[:, t, :, None] * x_BTHP[:, t])[..., None] * B_BTHN[:, t, :, None, :]
        state_BHPN = state_BHPN * decay_BTH[:, t, :, None, None] + write_BHPN
        out.append(torch.matmul(state_BHPN, C_BTHN[:, t, :, :, None])[..., 0])
    return torch.stack(out, dim=1), state_BHPN


def chunked_ssd_scan(
    x_BTHP: torch.Tensor,
    dt_BTH: torch.Tensor,
    A_H: torch.Tensor,
    B_BTHN: torch.Tensor,
    C_BTHN: torch.Tensor,
    state_BHPN: torch.Tensor,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ssd_scan `chunk` tokens at a time (state space duality): within a chunk, with cumulative log-decays c,
    y_l = exp(c_l) S_0 C_l + sum_{m <= l} exp(c_l - c_m) (C_l . B_m) dt_m x_m, a masked matmul; the state is
    carried from chunk to chunk."""
    b, t, h, p = x_BTHP.shape
    pad = (chunk - t % chunk) % chunk
    x, B, C = (F.pad(z, (0, 0, 0, 0, 0, pad)) for z in (x_BTHP, B_BTHN, C_BTHN))
    dt = F.pad(dt_BTH, (0, 0, 0, pad))
    n = (t + pad) // chunk
    x, B, C = (z.reshape(b, n, chunk, h, z.shape[-1]) for z in (x, B, C))
    dt = dt.reshape(b, n, chunk, h)
    decay = (dt * A_H).cumsum(2)  # [B, n, L, H]
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).triu(1)
    pair = (decay.unsqueeze(3) - decay.unsqueeze(2)).permute(0, 1, 4, 2, 3).masked_fill(future, float("-inf")).exp()
    xdt = x * dt[..., None]
    scores = torch.einsum("bnlhs,bnmhs->bnhlm", C, B) * pair
    within = torch.einsum("bnhlm,bnmhp->bnlhp", scores, xdt)
    to_end = (decay[:, :, -1:] - decay).exp()  # [B, n, L, H]
    writes = torch.einsum("bnmh,bnmhp,bnmhs->bnhps", to_end, xdt, B)
    chunk_decay = decay[:, :, -1].exp()  # [B, n, H]
    out = []
    for i in range(n):
        carried = torch.einsum("bhps,blhs->blhp", state_BHPN, C[:, i]) * decay[:, i].exp()[..., None]
        out.append(within[:, i] + carried)
        state_BHPN = state_BHPN * chunk_decay[:, i, :, None, None] + writes[:, i]
    return torch.cat(out, dim=1)[:, :t], state_BHPN


class Mamba2Mixer(nn.Module):
    """Mamba-2 (state space duality) as Granite 4.0-H has it, under its names: in_proj (gate z, then x, B, C, then
    dt per head), conv1d over x, B, C, dt_bias, A_log and D per head, a gated RMSNorm per group (norm), out_proj.
    Heads share B and C within each of the groups. A prompt runs the chunked scan (mamba_chunk tokens at a time), a
    decode step the recurrence."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        a, d = cfg.attention, cfg.hidden_size
        self.layer, self.layer_type = layer, "mamba2"
        self.inner, self.heads, self.groups, self.state = (
            a.mamba_expand * d,
            a.mamba_heads,
            a.mamba_groups,
            a.mamba_state,
        )
        self.head_dim, self.kernel, self.chunk = self.inner // self.heads, a.mamba_conv, a.mamba_chunk
        self.conv_dim = self.inner + 2 * self.groups * self.state
        self.in_proj = Linear(d, self.inner + self.conv_dim + self.heads, bias=a.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=a.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GroupGatedRMSNorm(self.inner, self.inner // self.groups, cfg.norm_eps)
        self.out_proj = Linear(self.inner, d, bias=a.mamba_proj_bias)

    def forward(self, h_BTD: torch.Tensor, inputs) -> torch.Tensor:
        cache = inputs.cache
        b, t, _ = h_BTD.shape
        h_BTD, saved, mask_BT1 = recurrent_inputs(inputs, self.layer, h_BTD)
        gate, xbc, dt = self.in_proj(h_BTD).split([self.inner, self.conv_dim, self.heads], dim=-1)
        xbc_BCT, conv_state = short_conv(xbc.transpose(1, 2), self.conv1d, saved)
        xbc = xbc_BCT.transpose(1, 2)
        if mask_BT1 is not None:
            xbc = xbc * mask_BT1
        x, B, C = xbc.split([self.inner, self.groups * self.state, self.groups * self.state], dim=-1)
        per = self.heads // self.groups

        def by_head(z: torch.Tensor) -> torch.Tensor:  # [B, T, G*N] -> [B, T, H, N] fp32, heads sharing their group's
            return z.reshape(b, t, self.groups, self.state).float().repeat_interleave(per, dim=2)

        dt_BTH = F.softplus(dt.float() + self.dt_bias.float())
        state = saved[1] if saved is not None else h_BTD.new_zeros(b, self.heads, self.head_dim, self.state).float()
        x_BTHP = x.reshape(b, t, self.heads, self.head_dim).float()
        A_H = -torch.exp(self.A_log.float())
        if t == 1:
            y_BTHP, state = ssd_scan(x_BTHP, dt_BTH, A_H, by_head(B), by_head(C), state)
        else:
            y_BTHP, state = chunked_ssd_scan(x_BTHP, dt_BTH, A_H, by_head(B), by_head(C), state, self.chunk)
        if cache is not None:
            cache.set_state(self.layer, conv_state, state)
        y_BTHP = y_BTHP + x_BTHP * self.D.float()[:, None]
        y = self.norm(y_BTHP.reshape(b, t, -1).to(h_BTD.dtype), gate)
        return self.out_proj(y.to(h_BTD.dtype))


class GroupGatedRMSNorm(nn.Module):
    """y * SiLU(gate), then RMS-normed within groups of group_size channels, times the weight (Mamba-2's norm)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(gate.float())
        grouped = gated.view(*gated.shape[:-1], -1, self.group_size)
        normed = unweighted_rms_norm(grouped, self.eps).view(gated.shape)
        return self.weight * normed.to(y.dtype)
