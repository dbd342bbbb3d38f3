"""TransMIL (Shao et al., NeurIPS 2021) with the xMIL-LRP rules (Hense et al., NeurIPS 2024, App. A).

Tokens: fc1(X) padded to a square grid by appending its first tokens, a learned CLS token in front;
TransLayer -> PPEG -> TransLayer(s) -> LayerNorm -> CLS -> (MLP) -> head. Attention is Nyström
(Xiong et al., AAAI 2021) with m = dim/2 landmarks and a 6-step Moore-Penrose iteration, plus a
depthwise 33x1 convolution of the values.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tub_xmil.lrp import LRPParams, gamma_module, layer_norm_rule, linear_block


def moore_penrose_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative pseudo-inverse z <- z/4 (13I - xz(15I - xz(7I - xz))) (Razavi et al. 2014).

    z0 = x^T / (max row sum * max column sum), the maxima taken per bag over heads and rows.
    """
    ax = x.abs()
    row = ax.sum(-1).flatten(1).amax(1)  # per bag
    col = ax.sum(-2).flatten(1).amax(1)
    z = x.transpose(-1, -2) / (row * col).view(-1, *([1] * (x.dim() - 1)))
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


class NystromAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, num_landmarks: int | None = None,
                 pinv_iterations: int = 6, residual_conv_kernel: int = 33, dropout: float = 0.1,
                 method: str = "nystrom", bias: bool = True):
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.num_landmarks = num_landmarks or dim // 2
        self.pinv_iterations, self.method = pinv_iterations, method
        self.scale = self.dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * self.dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * self.dim_head, dim, bias=bias), nn.Dropout(dropout))
        k = residual_conv_kernel
        self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def _factors(self, x, to_qkv):
        """(v, B, C, pad) with the attention A = B C: Nystrom B = a1 a2^+ (n'xm), C = a3 (mxn');
        full attention B = A, C = None. A itself (n'xn') is never formed."""
        b, n, _ = x.shape
        m = self.num_landmarks
        pad = 0
        if self.method == "nystrom" and n % m:
            pad = m - n % m
            x = F.pad(x, (0, 0, pad, 0), value=0.0)
        q, k, v = to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        if self.method != "nystrom":
            return v, (q @ k.transpose(-1, -2)).softmax(-1), None, pad
        l = math.ceil(n / m)
        ql = q.reshape(b, self.heads, m, l, self.dim_head).sum(3) / l
        kl = k.reshape(b, self.heads, m, l, self.dim_head).sum(3) / l
        a1 = (q @ kl.transpose(-1, -2)).softmax(-1)
        a2 = (ql @ kl.transpose(-1, -2)).softmax(-1)
        a3 = (ql @ k.transpose(-1, -2)).softmax(-1)
        return v, a1 @ moore_penrose_pinv(a2, self.pinv_iterations), a3, pad

    def _attention(self, x, to_qkv, mode):
        """mode: 'forward' | 'scores' (also return the attention as its factors) | 'lrp' (AH rule).

        The output is B (C v), O(n' m) memory; 'scores' returns the pair (B, C). The AH rule treats
        A as constant, so the LRP output B.detach() (C.detach() v) equals A.detach() v in value and
        in its gradient with respect to v."""
        v, bf, cf, pad = self._factors(x, to_qkv)
        if mode == "lrp":
            bf, cf = bf.detach(), (None if cf is None else cf.detach())
        out = bf @ (v if cf is None else cf @ v)
        return out, v, ((bf, cf) if mode == "scores" else None), pad

    def forward(self, x, return_attention: bool = False, lrp: LRPParams | None = None):
        n = x.shape[1]
        if lrp is not None:
            out, v, attn, pad = self._attention(
                x, gamma_module(self.to_qkv, lrp.gamma, lrp.no_bias), "lrp")
            res_conv = gamma_module(self.res_conv, lrp.gamma, lrp.no_bias)
            to_out = gamma_module(self.to_out[0], lrp.gamma, lrp.no_bias)
        else:
            out, v, attn, pad = self._attention(x, self.to_qkv, "scores" if return_attention else "forward")
            res_conv, to_out = self.res_conv, self.to_out
        out = out + res_conv(v)
        b, h, n2, d = out.shape
        out = to_out(out.transpose(1, 2).reshape(b, n2, h * d))[:, -n:]
        return (out, attn, pad) if return_attention else out


def _head_mean_apply(bf: torch.Tensor, cf: torch.Tensor | None, r: torch.Tensor | None) -> torch.Tensor:
    """With A = mean_h B_h C_h (C None: A = mean_h B_h): r A for a row vector r (b, n'), or the
    row sums A 1 when r is None; (b, n') either way, without forming A."""
    if r is None:
        if cf is None:
            return bf.sum(-1).mean(1)
        return (bf @ cf.sum(-1, keepdim=True)).squeeze(-1).mean(1)
    rb = (r[:, None, None, :] @ bf)  # (b, h, 1, m) or (b, h, 1, n')
    if cf is not None:
        rb = rb @ cf
    return rb.squeeze(2).mean(1)


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int = 8, dropout_att: float = 0.1, attention: str = "nystrom",
                 bias: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dropout=dropout_att, method=attention, bias=bias)

    def forward(self, x, return_attention: bool = False):
        if return_attention:
            y, attn, pad = self.attn(self.norm(x), return_attention=True)
            return x + y, attn, pad
        return x + self.attn(self.norm(x))

    def lrp_forward(self, x, params: LRPParams):
        return x + self.attn(layer_norm_rule(x, self.norm.weight, self.norm.bias), lrp=params)


class PPEG(nn.Module):
    """Pyramid position encoding: x + DWConv7 + DWConv5 + DWConv3 on the token grid; CLS passes."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, side: int, params: LRPParams | None = None):
        convs = [self.proj, self.proj1, self.proj2]
        if params is not None:
            convs = [gamma_module(c, params.gamma, params.no_bias) for c in convs]
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        g = feat.transpose(1, 2).reshape(b, c, side, side)
        g = g + convs[0](g) + convs[1](g) + convs[2](g)
        return torch.cat([cls, g.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    kind = "transmil"

    def __init__(self, input_dim: int, head_dim: int = 2, n_feat: int = 256, n_layers: int = 2,
                 attention: str = "nystrom", dropout_att: float = 0.1, dropout_class: float = 0.5,
                 dropout_feat: float = 0.0, n_out_layers: int = 0, bias: bool = True):
        super().__init__()
        if n_layers < 2:
            raise ValueError("TransMIL needs n_layers >= 2")
        self.input_dim, self.head_dim = input_dim, head_dim
        self._fc1 = nn.Sequential(nn.Linear(input_dim, n_feat, bias=bias), nn.ReLU())
        self.pos_layer = PPEG(n_feat)
        self.norm = nn.LayerNorm(n_feat)
        self.translayers = nn.Sequential(*[TransLayer(n_feat, dropout_att=dropout_att, attention=attention,
                                                      bias=bias) for _ in range(n_layers)])
        self.dropout_class = nn.Dropout(dropout_class)
        self.dropout_feat = nn.Dropout(dropout_feat)
        self.cls_token = nn.Parameter(torch.randn(1, 1, n_feat))
        self.mlp_layers = nn.Sequential(*[nn.Sequential(nn.Linear(n_feat, n_feat, bias=bias), nn.ReLU())
                                          for _ in range(n_out_layers)])
        self._fc2 = nn.Linear(n_feat, head_dim, bias=bias)

    @staticmethod
    def square_pad(h):
        """Append the first side^2 - N tokens so the N tokens fill a side x side grid."""
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        return torch.cat([h, h[:, : side * side - n]], dim=1), side

    def _tokens(self, h):
        h, side = self.square_pad(h)
        return torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1), side

    def forward(self, x, return_attention: bool = False):
        x = x if x.dim() == 3 else x[None]
        h = self.dropout_feat(self._fc1(x.float()))
        h, side = self._tokens(h)
        attns = []
        for i, layer in enumerate(self.translayers):
            if return_attention:
                h, attn, pad = layer(h, return_attention=True)
                attns.append((attn, pad))
            else:
                h = layer(h)
            if i == 0:
                h = self.pos_layer(h, side)
        h = self.norm(h)[:, 0]
        out = self._fc2(self.dropout_class(self.mlp_layers(h)))
        return (out, attns) if return_attention else out

    def attention_rollout(self, x, column_scaling: bool = False) -> torch.Tensor:
        """Attention rollout (Abnar & Zuidema 2020) over both layers, heads averaged, with
        A~ = (A + I)/2 row-normalised; read the CLS row (index p, the Nyström padding) over the N
        patch columns. ``column_scaling`` reproduces the reference's division by a.sum(-1) without
        keepdim (for parity checks only).

        The rollout is A~_L ... A~_1 and only its CLS row e_p^T A~_L ... A~_1 is read, so the row
        vector r is carried from the last layer to the first, r <- r A~_l, with the head-mean
        A = mean_h B_h C_h kept in its Nyström factors (B_h = a1 a2^+, C_h = a3): r A =
        mean_h (r B_h) C_h and the row sums A 1 = mean_h B_h (C_h 1). With d = (A 1 + 1)/2 the
        row sums of (A + I)/2, row normalisation gives r A~ = ((r/d) A + r/d)/2 and column
        scaling (column j divided by d_j) gives r A~ = ((r A + r)/2)/d. O(n' m) memory instead
        of n'^2 per head."""
        x = x if x.dim() == 3 else x[None]
        n = x.shape[1]
        with torch.no_grad():
            _, attns = self.forward(x, return_attention=True)
            p = attns[0][1]
            (b0, _), _ = attns[0]
            r = torch.zeros(b0.shape[0], b0.shape[2], dtype=b0.dtype, device=b0.device)
            r[:, p] = 1
            for (bf, cf), _ in reversed(attns):
                d = (_head_mean_apply(bf, cf, None) + 1) / 2
                if column_scaling:
                    r = (_head_mean_apply(bf, cf, r) + r) / 2 / d
                else:
                    r = r / d
                    r = (_head_mean_apply(bf, cf, r) + r) / 2
        return r[:, p + 1: p + 1 + n]

    def lrp_blocks(self, params: LRPParams, **_):
        fc1 = self._fc1[0]
        fc1_mod = gamma_module(fc1, params.gamma, params.no_bias)
        side_box = {}

        def fc1_block(a):
            y, side = self._tokens(F.relu(fc1(a)))
            y_p, _ = self._tokens(fc1_mod(a))
            side_box["side"] = side
            return y, y_p

        blocks = [("fc1", fc1_block),
                  ("translayer-0", lambda a: (self.translayers[0].lrp_forward(a, params), None)),
                  ("pos-enc", lambda a: (self.pos_layer(a, side_box["side"], params), None))]
        for i, layer in enumerate(self.translayers[1:]):
            blocks.append((f"translayer-{i + 1}", lambda a, layer=layer: (layer.lrp_forward(a, params), None)))
        blocks.append(("norm-layer", lambda a: (layer_norm_rule(a, self.norm.weight, self.norm.bias), None)))
        blocks.append(("pooler", lambda a: (a[:, 0], None)))
        blocks += [(f"mlp-{i}", linear_block(b[0], params)) for i, b in enumerate(self.mlp_layers)]
        blocks.append(("classifier", linear_block(self._fc2, params, act=None)))
        return blocks
