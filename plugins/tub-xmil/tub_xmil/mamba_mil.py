"""Mamba-based MIL (MambaMIL; Yang et al., MICCAI 2024) with a pure-PyTorch selective scan.

Mamba block (Gu & Dao 2023, Alg. 2): in_proj -> (u, z); u -> causal depthwise conv (k=4) -> SiLU;
x_proj -> (dt, B, C); dt = softplus(dt_proj(dt) + bias);
x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,  y_t = C_t x_t + D u_t,  A = -exp(A_log);
out = out_proj(y * SiLU(z)). The CUDA ``mamba_ssm`` kernel is not needed.

xMIL-LRP rules for Mamba (Jamshidi Idaji et al. 2026): SiLU(x) -> x sigma(x).detach(); the scan with
dt, A, B, C detached; the gate y (z sigma(z).detach()); then the half rule y/2 + (y/2).detach().
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tub_xmil.lrp import LRPParams, gamma_module, layer_norm_rule, linear_block


def _scan_chunk(state, du, dt, A, B, C):
    """One chunk of the scan. state: (b, d, n); du = dt * u, dt: (b, c, d); A: (d, n); B, C: (b, c, n).

    x_t = exp(cum_t) state + sum_{j<=t} exp(cum_t - cum_j) dt_j B_j u_j with cum_t = sum_{r<=t} dt_r A.
    Returns (y, x_last): y_t = C_t x_t (b, c, d) and the state after the chunk (b, d, n).
    """
    cum = torch.cumsum(dt[..., None] * A, dim=1)  # (b, c, d, n): sum_{r<=t} dA_r, dA <= 0
    dBu = du[..., None] * B[:, :, None, :]  # (b, c, d, n)
    diff = cum[:, :, None] - cum[:, None, :]  # (b, t, j, d, n)
    c = dt.shape[1]
    tri = torch.ones(c, c, dtype=torch.bool, device=dt.device).tril()
    w = torch.where(tri[None, :, :, None, None], diff, torch.full_like(diff, float("-inf"))).exp()
    xs = torch.exp(cum) * state[:, None] + (w * dBu[:, None]).sum(2)
    return torch.einsum("btdn,btn->btd", xs, C), xs[:, -1]


def _scan_forward(du, dt, A, B, C, chunk):
    """All chunks in order, into preallocated outputs (no autograd). Returns y (b, l, d) and the
    state entering every chunk (k, b, d, n)."""
    b, l, d = du.shape
    dtype = torch.promote_types(torch.promote_types(du.dtype, dt.dtype), torch.promote_types(A.dtype, B.dtype))
    dtype = torch.promote_types(dtype, C.dtype)
    starts = range(0, l, chunk)
    y = du.new_empty(b, l, d, dtype=dtype)
    states = du.new_empty(len(starts), b, d, A.shape[1], dtype=dtype)
    state = states[0].zero_()
    for i, s in enumerate(starts):
        e = min(l, s + chunk)
        if i:
            states[i] = state
        y[:, s:e], state = _scan_chunk(states[i], du[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e])
    return y, states


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan with chunk-wise recomputation in backward (activation checkpointing).

    Forward keeps only its inputs and the (b, d, n) state entering each chunk; backward walks the
    chunks in reverse, rebuilds each chunk's autograd graph from its saved entering state and
    differentiates it (the carried state's gradient flows into the previous chunk). Only one
    chunk's (b, c, c, d, n) tensors exist at any time, and every long-lived buffer is allocated
    before the chunk loop (no heap fragmentation from interleaved allocations). The recomputed
    graph is the plain one of :func:`_scan_chunk`; inputs that do not require a gradient (the
    LRP rule detaches dt, A, B, C) get none, as in plain autograd.
    """

    @staticmethod
    def forward(ctx, du, dt, A, B, C, chunk):
        y, states = _scan_forward(du, dt, A, B, C, chunk)
        ctx.save_for_backward(du, dt, A, B, C, states)
        ctx.chunk = chunk
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        du, dt, A, B, C, states = ctx.saved_tensors
        need = ctx.needs_input_grad[:5]
        full = (du, dt, A, B, C)
        grads = [torch.zeros_like(t) if nd else None for t, nd in zip(full, need)]
        l, chunk = du.shape[1], ctx.chunk
        gstate = None
        for i in reversed(range(len(states))):
            s = i * chunk
            e = min(l, s + chunk)
            with torch.enable_grad():
                state = states[i].detach().requires_grad_(i > 0)
                parts = [t.detach() if t.dim() == 2 else t[:, s:e].detach() for t in full]  # A is (d, n)
                parts = [t.requires_grad_(nd) for t, nd in zip(parts, need)]
                y, x_last = _scan_chunk(state, *parts)
                inputs = [t for t in [state] + parts if t.requires_grad]
                outs, gouts = [y], [gy[:, s:e]]
                if gstate is not None:
                    outs.append(x_last), gouts.append(gstate)
                g = list(torch.autograd.grad(outs, inputs, gouts))
            gstate = g.pop(0) if i > 0 else None
            for k, nd in enumerate(need):
                if nd:
                    gk = g.pop(0)
                    if k == 2:
                        grads[k] += gk
                    else:
                        grads[k][:, s:e] = gk
        return (*grads, None)


def selective_scan(u, delta, A, B, C, D, delta_bias=None, chunk: int | None = None,
                   checkpoint: bool = True):
    """Selective scan. u, delta: (b, d, l); A: (d, n); B, C: (b, n, l); D: (d,). Returns (b, d, l).

    Sequential over chunks of ``chunk`` steps; inside a chunk the recurrence is unrolled with
    cumulative products of exp(dt A) in closed form, so the Python loop runs l/chunk times.
    The 4-D (b, c, d, n) / (b, c, c, d, n) tensors are built per chunk only. With ``checkpoint``
    (default) a gradient is computed by recomputing the chunks in backward (:class:`_ChunkedScan`):
    memory O(b l (d + n) + b c^2 d n) instead of O(b l c d n) for training and LRP, with the
    gradients of plain autograd. ``checkpoint=False``: plain autograd through every chunk (keeps
    all chunk tensors; for tests).
    """
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    delta = F.softplus(delta)
    b, d, l = u.shape
    n = A.shape[1]
    if chunk is None:
        # short chunks: the closed form costs O(c) per step, and c = 4 ran 3.7-6x faster than 15-32 on a 2-core
        # CPU (d 256-1024, l 1000-4000, forward + backward); longer ones only where the states kept per chunk
        # (l/c x b x d x n) would pass ~1e8 values, and never past ~4M values in the (b, c, c, d, n) chunk tensor
        chunk = max(4, math.ceil(l * b * d * n / 1e8))
        chunk = int(max(1, min(chunk, 32, (4e6 / max(b * d * n, 1)) ** 0.5)))
    # one cast (not one per chunk) so A's gradient is summed over all chunks in the scan's dtype
    A = A.to(torch.promote_types(A.dtype, delta.dtype))
    dt = delta.permute(0, 2, 1)  # (b, l, d)
    du = (delta * u).permute(0, 2, 1)  # (b, l, d)
    Bt, Ct = B.permute(0, 2, 1), C.permute(0, 2, 1)  # (b, l, n)
    args = (du, dt, A, Bt, Ct)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in args)):
        y = _scan_forward(*args, chunk)[0]
    elif checkpoint:
        y = _ChunkedScan.apply(*args, chunk)
    else:
        state, ys = du.new_zeros(b, d, n), []
        for s in range(0, l, chunk):
            e = min(l, s + chunk)
            yc, state = _scan_chunk(state, du[:, s:e], dt[:, s:e], A, Bt[:, s:e], Ct[:, s:e])
            ys.append(yc)
        y = torch.cat(ys, dim=1)
    return y.permute(0, 2, 1) + u * D[None, :, None]


def selective_scan_sequential(u, delta, A, B, C, D, delta_bias=None):
    """The recurrence step by step (the definition; used to test :func:`selective_scan`)."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    delta = F.softplus(delta)
    b, d, l = u.shape
    x = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        x = torch.exp(delta[:, :, t, None] * A) * x + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((x * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=2) + u * D[None, :, None]


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)
                                            ).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, h, lrp: bool = False):
        b, l, _ = h.shape
        xz = self.in_proj(h).transpose(1, 2)  # (b, 2d, l)
        A = -torch.exp(self.A_log.float())
        u, z = xz.chunk(2, dim=1)
        u = self.conv1d(u)[..., :l]
        u = u * torch.sigmoid(u).detach() if lrp else F.silu(u)
        x_dbl = self.x_proj(u.transpose(1, 2))  # (b, l, r + 2n)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)
        if lrp:
            dt, A, Bm, Cm = dt.detach(), A.detach(), Bm.detach(), Cm.detach()
        y = selective_scan(u, dt, A, Bm, Cm, self.D.float(), delta_bias=self.dt_proj.bias.float())
        if lrp:
            y = y * (z * torch.sigmoid(z).detach())
            y = y / 2.0 + (y / 2.0).detach()
        else:
            y = y * F.silu(z)
        return self.out_proj(y.transpose(1, 2))


class MambaLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(dim)


class MambaBlock(nn.Module):
    """Layers of LN -> Mamba; one residual h + h' after all layers."""

    def __init__(self, dim: int, num_layers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList([MambaLayer(dim) for _ in range(num_layers)])

    def forward(self, h, lrp: bool = False):
        h0 = h
        for layer in self.layers:
            h = layer_norm_rule(h, layer.norm.weight, layer.norm.bias) if lrp else layer.norm(h)
            h = layer.mamba(h, lrp=lrp)
        return h + h0


class MambaMIL(nn.Module):
    kind = "mambamil"

    def __init__(self, input_dim: int, head_dim: int = 2, features_dim: int = 512, num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.input_dim, self.head_dim = input_dim, head_dim
        self.proj = nn.Sequential(nn.Linear(input_dim, features_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.mamba_block = MambaBlock(features_dim, num_layers)
        self.norm = nn.LayerNorm(features_dim)
        self.attention = nn.Sequential(nn.Linear(features_dim, 128), nn.Tanh(), nn.Linear(128, 1))
        self.linear_head = nn.Linear(features_dim, head_dim)

    def _tokens(self, x):
        return self.norm(self.mamba_block(self.dropout(self.proj(x))))

    def forward(self, x):
        x = x if x.dim() == 3 else x[None]
        h = self._tokens(x.float())
        a = torch.softmax(self.attention(h), dim=1)
        return self.linear_head((a.transpose(1, 2) @ h)[:, 0])

    def attention_weights(self, x):
        x = x if x.dim() == 3 else x[None]
        return torch.softmax(self.attention(self._tokens(x.float())), dim=1)[..., 0]

    def lrp_blocks(self, params: LRPParams, **_):
        def agg(h):
            a = torch.softmax(self.attention(h.detach()), dim=1).detach()
            return (a.transpose(1, 2) @ h)[:, 0], None

        head_mod = gamma_module(self.linear_head, params.gamma, params.no_bias)
        return [
            ("projection", linear_block(self.proj[0], params)),
            ("correlation", lambda a: (self.mamba_block(a, lrp=True), None)),
            ("norm", lambda a: (layer_norm_rule(a, self.norm.weight, self.norm.bias), None)),
            ("aggregation", agg),
            ("classification", lambda a: (self.linear_head(a), head_mod(a))),
        ]
