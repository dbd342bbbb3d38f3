"""Additive MIL (Javed et al., *Additive MIL: Intrinsically Interpretable Multiple Instance Learning
for Pathology*, NeurIPS 2022), the inherently interpretable baseline of the xMIL comparison.

ABMIL's encoder and attention, but the classifier reads each attention-scaled patch on its own,
c_i = psi(a_i h_i), and the bag logits are their sum, y = sum_i c_i. The patch scores
s_i = c_i[y] therefore add up to the explained logit exactly (the ``patch_scores`` method).
"""

from __future__ import annotations

import torch

from tub_xmil.attention_mil import AttentionMIL, drop_one_closed_form
from tub_xmil.lrp import LRPParams, linear_block


class AdditiveMIL(AttentionMIL):
    """Same constructor as :class:`AttentionMIL`; ``n_out_layers`` hidden layers in psi."""

    kind = "additivemil"

    def patch_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """c_i = psi(a_i h_i), shape (B, N, head_dim); masked patches contribute nothing."""
        x = x if x.dim() == 3 else x[None]
        h = self.encode(x)
        s = self.attention_logits(h)
        if mask is not None:
            s = s.masked_fill(~mask[..., None], float("-inf"))
        c = self.head(torch.softmax(s, dim=1) * h)
        return c if mask is None else c * mask[..., None]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.patch_logits(x, mask).sum(1)

    def forward_from_first(self, z: torch.Tensor) -> torch.Tensor:
        """The forward pass from the first layer's pre-activation z = W x + b (eval mode)."""
        h = torch.relu(z)
        for block in self.linear_layers[1:]:
            h = block(h)
        h = self.linear_dropout(h)
        return self.head(torch.softmax(self.attention_logits(h), dim=1) * h).sum(1)

    drop_chunk = 64  # at most this many bags per (bags, N, F) block of the batched drop-one
    drop_budget_bytes = 512 * 2 ** 20  # and at most this much per block

    def pool_kept(self, a: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Drop-one bags: psi re-run on the renormalised a_j h_j, the dropped patch contributing nothing."""
        return (self.head(a[..., None] * h[None]) * keep[..., None]).sum(1)

    def _psi_affine(self):
        """(g, b) with psi(a h) = a g(h) + b for every a >= 0, or None where psi is not of that form.

        Eval mode only (dropout off). No hidden layer: psi(a h) = W (a h) + b = a (W h) + b. Hidden
        ReLU layers without biases and a bias-free head: psi is positively homogeneous, psi(a h) = a psi(h)."""
        if self.training:
            return None
        if len(self.out_layers) == 0:
            w = self.linear_head.weight
            return (lambda h: h @ w.t()), self.linear_head.bias
        if self.linear_head.bias is None and all(block[0].bias is None for block in self.out_layers):
            return self.head, None
        return None

    def drop_one_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the N bags X minus {x_i}.

        Where psi(a h) = a g(h) + b (:meth:`_psi_affine`), the bag without patch i has the logits
        sum_{j != i} (a^(i)_j g_j + b) = (sum_{j != i} e^{s_j} g_j) / (sum_{j != i} e^{s_j}) + (N - 1) b,
        a^(i) the softmax over the kept patches: O(N F) in all (:func:`drop_one_closed_form`).
        Otherwise psi is re-run on (bags, N, F) blocks, O(N^2 F) (:meth:`drop_one_logits_batched`).
        A bag of one leaves the empty bag: spec §2.5's zero bag of the original size, f(zeros(1, D))."""
        x = x if x.dim() == 2 else x[0]
        if len(x) == 1:
            return self(torch.zeros_like(x)[None])
        form = self._psi_affine()
        if form is None:
            return self.drop_one_logits_batched(x)
        g_of, b = form
        h = self.encode(x)
        return drop_one_closed_form(self.attention_logits(h)[:, 0], g_of(h), b)

    def drop_one_logits_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Drop-one logits by re-running psi on every kept a^(i)_j h_j (any psi): AttentionMIL's
        drop-one, in blocks of :meth:`drop_bags_per_block` bags."""
        return self.drop_one_logits_masked(x)

    def drop_bags_per_block(self, h: torch.Tensor) -> int:
        """At most ``drop_chunk`` bags and ``drop_budget_bytes`` of (bags, N, F) tensors per block."""
        n, f = h.shape
        per_bag = n * f * h.element_size() * (3 + len(self.out_layers))  # a h, hidden layers, masks
        return int(max(1, min(self.drop_chunk, self.drop_budget_bytes // max(per_bag, 1))))

    def lrp_blocks(self, params: LRPParams, **_):
        """Encoder, attention scaling with a detached (AH rule), psi per patch, then the sum."""
        blocks = [(f"fc1-{i}", linear_block(b[0], params)) for i, b in enumerate(self.linear_layers)]

        def attend(h):
            a = torch.softmax(self.attention_logits(h.detach()), dim=1).detach()
            return a * h, None

        blocks.append(("attention-scaling", attend))
        blocks += [(f"layerout-{i}", linear_block(b[0], params)) for i, b in enumerate(self.out_layers)]
        blocks.append(("classifier", linear_block(self.linear_head, params, act=None)))
        blocks.append(("sum", lambda c: (c.sum(1), None)))
        return blocks
