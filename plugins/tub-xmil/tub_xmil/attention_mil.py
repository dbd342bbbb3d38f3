"""Attention-based MIL (Ilse et al., ICML 2018), as used by xMIL (Hense et al., NeurIPS 2024).

H = enc(X); a = softmax_i(w^T tanh(V h_i)) (gated: * sigmoid(U h_i)); z = sum_i a_i h_i; y = head(z).
The first encoder layer always has a bias (as in the reference checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tub_xmil.lrp import LRPParams, linear_block


class AttentionMIL(nn.Module):
    """Inputs are bags ``(B, N, D)`` (or one bag ``(N, D)``); outputs ``(B, head_dim)``."""

    kind = "attnmil"

    def __init__(self, input_dim: int, head_dim: int = 2, features_dim: int = 256,
                 inner_attention_dim: int = 128, num_layers: int = 1, n_out_layers: int = 0,
                 dropout: float = 0.0, dropout_strategy: str = "features", bias: bool = True,
                 gated: bool = False):
        super().__init__()
        self.input_dim, self.head_dim, self.gated = input_dim, head_dim, gated
        layers = [nn.Sequential(nn.Linear(input_dim, features_dim), nn.ReLU())]
        layers += [nn.Sequential(nn.Linear(features_dim, features_dim, bias=bias), nn.ReLU())
                   for _ in range(num_layers - 1)]
        self.linear_layers = nn.Sequential(*layers)
        self.attention = nn.Sequential(nn.Linear(features_dim, inner_attention_dim), nn.Tanh(),
                                       nn.Linear(inner_attention_dim, 1))
        self.attention_gate = (nn.Sequential(nn.Linear(features_dim, inner_attention_dim), nn.Sigmoid())
                               if gated else None)
        self.out_layers = nn.Sequential(*[
            nn.Sequential(nn.Linear(features_dim, features_dim, bias=bias), nn.ReLU())
            for _ in range(n_out_layers)])
        self.linear_head = nn.Linear(features_dim, head_dim, bias=bias)
        p = dropout or 0.0
        self.feature_dropout = nn.Dropout(p if dropout_strategy in ("features", "all") else 0.0)
        self.linear_dropout = nn.Dropout(p if dropout_strategy == "all" else 0.0)
        self.classifier_dropout = nn.Dropout(p if dropout_strategy in ("all", "last") else 0.0)

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            first, act, last = self.attention
            return last(act(first(h)) * self.attention_gate(h))
        return self.attention(h)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_dropout(self.linear_layers(self.feature_dropout(x)))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear_head(self.classifier_dropout(self.out_layers(z)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x if x.dim() == 3 else x[None]
        h = self.encode(x)
        s = self.attention_logits(h)  # (B, N, 1)
        if mask is not None:
            s = s.masked_fill(~mask[..., None], float("-inf"))
        a = torch.softmax(s, dim=1)
        z = (a.transpose(1, 2) @ h)[:, 0]
        return self.head(z)

    @property
    def first_linear(self) -> nn.Linear:
        return self.linear_layers[0][0]

    def forward_from_first(self, z: torch.Tensor) -> torch.Tensor:
        """The forward pass from the first layer's pre-activation z = W x + b (eval mode)."""
        h = torch.relu(z)
        for block in self.linear_layers[1:]:
            h = block(h)
        h = self.linear_dropout(h)
        a = torch.softmax(self.attention_logits(h), dim=1)
        return self.head((a.transpose(1, 2) @ h)[:, 0])

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dim() == 3 else x[None]
        return torch.softmax(self.attention_logits(self.encode(x)), dim=1)[..., 0]

    def lrp_blocks(self, params: LRPParams, **_):
        """Blocks for :func:`tub_xmil.lrp.lrp_chain`; attention pooling uses the AH rule
        (attention weights detached: R_id = a_i h_id / (sum_j a_j h_jd) R_d)."""
        blocks = [(f"fc1-{i}", linear_block(b[0], params)) for i, b in enumerate(self.linear_layers)]

        def agg(h):
            a = torch.softmax(self.attention_logits(h.detach()), dim=1).detach()
            return (a.transpose(1, 2) @ h)[:, 0], None

        blocks.append(("aggregation", agg))
        blocks += [(f"layerout-{i}", linear_block(b[0], params)) for i, b in enumerate(self.out_layers)]
        blocks.append(("classifier", linear_block(self.linear_head, params, act=None)))
        return blocks

    def keep_one_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the N single-patch bags {x_i} in one pass (a bag of one has a = 1)."""
        x = x if x.dim() == 2 else x[0]
        return self.head(self.encode(x))

    drop_chunk = 256  # bags per batch in drop_one_logits

    def drop_one_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the N bags X minus {x_i}, from one encoder pass in O(N F): an attention logit depends
        on its own patch only, so bag i pools z_i = (sum_{j != i} e^{s_j} h_j) / (sum_{j != i} e^{s_j})
        (:func:`drop_one_closed_form`), and the head runs on the N pooled vectors.

        A bag of one leaves the empty bag, whose softmax over no patch is NaN; spec §2.5 scores the
        empty bag as the all-zero bag of the original size, f(zeros(1, D))."""
        x = x if x.dim() == 2 else x[0]
        if len(x) == 1:
            return self(torch.zeros_like(x)[None])
        h = self.encode(x)
        return self.head(drop_one_closed_form(self.attention_logits(h)[:, 0], h))

    def drop_one_logits_masked(self, x: torch.Tensor) -> torch.Tensor:
        """The same N bags by a masked softmax per bag, in blocks of :meth:`drop_bags_per_block` bags:
        O(N^2 F), for models whose pooling of the kept patches (:meth:`pool_kept`) has no closed form."""
        x = x if x.dim() == 2 else x[0]
        if len(x) == 1:
            return self(torch.zeros_like(x)[None])
        h = self.encode(x)
        s = self.attention_logits(h)[:, 0]
        n = len(s)
        chunk = self.drop_bags_per_block(h)
        out = []
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(n, start + chunk), device=x.device)
            keep = torch.ones(len(idx), n, dtype=torch.bool, device=x.device)
            keep[torch.arange(len(idx), device=x.device), idx] = False
            a = torch.softmax(s[None].expand(len(idx), n).masked_fill(~keep, float("-inf")), dim=1)
            out.append(self.pool_kept(a, h, keep))
        return torch.cat(out)

    def drop_bags_per_block(self, h: torch.Tensor) -> int:
        """Drop-one bags per block of :meth:`drop_one_logits` (pooling is (bags, N) x (N, F) here)."""
        return self.drop_chunk

    def pool_kept(self, a: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Logits of bags given their attention ``a`` (B, N) over the patches ``h`` (N, F) they keep."""
        return self.head(a @ h)


def drop_one_closed_form(s: torch.Tensor, g: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Row i: (sum_{j != i} e^{s_j} g_j) / (sum_{j != i} e^{s_j}) + (N - 1) b, the drop-one bags' pooled
    features of AttnMIL (g = h, no b) or logits of an additive model with psi(a h) = a g + b.
    s: (N,) attention logits, g: (N, K). Accumulated in float64 (at least) after shifting s by its maximum (log-sum-exp); the
    sums over j != i are the full sums minus term i. Where patch i holds more than half the softmax
    mass, Z - e_i cancels: that row (at most one) is summed directly over the other patches with
    their own maximum shift. N = 1 leaves an empty bag: NaN, as the softmax over no patch
    (:meth:`AdditiveMIL.drop_one_logits` scores that bag by spec §2.5's zero-bag rule instead)."""
    n = s.shape[0]
    acc = torch.promote_types(g.dtype, torch.float64)
    s64, g64 = s.to(acc), g.to(acc)
    e = torch.exp(s64 - s64.max())
    z = e.sum()
    out = ((e @ g64)[None] - e[:, None] * g64) / (z - e)[:, None]
    for i in torch.nonzero(e > 0.5 * z).flatten().tolist():
        if n == 1:
            out[i] = float("nan")
            continue
        keep = torch.ones(n, dtype=torch.bool, device=s.device)
        keep[i] = False
        ek = torch.exp(s64[keep] - s64[keep].max())
        out[i] = (ek @ g64[keep]) / ek.sum()
    if b is not None:
        out = out + (n - 1) * b.to(acc)
    return out.to(g.dtype)
