"""Additive MIL (Javed et al., *Additive MIL: Intrinsically Interpretable Multiple Instance Learning
for Pathology*, NeurIPS 2022), the inherently interpretable baseline of the xMIL comparison.

ABMIL's encoder and attention, but the classifier reads each attention-scaled patch on its own,
c_i = psi(a_i h_i), and the bag logits are their sum, y = sum_i c_i. The patch scores
s_i = c_i[y] therefore add up to the explained logit exactly (the ``patch_scores`` method).
"""

from __future__ import annotations

import torch

from tub_xmil.attention_mil import AttentionMIL
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

    drop_chunk = 64  # psi runs on (bags, N, F) here

    def pool_kept(self, a: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Drop-one bags: psi re-run on the renormalised a_j h_j, the dropped patch contributing nothing."""
        return (self.head(a[..., None] * h[None]) * keep[..., None]).sum(1)

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
