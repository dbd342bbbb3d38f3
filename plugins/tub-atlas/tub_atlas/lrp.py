"""Conservative LRP for Vision Transformers (Ali et al., *XAI for Transformers: Better Explanations
through Conservative Propagation*, ICML 2022, arXiv 2202.07304; spec §2.9).

The forward pass is re-run with the rules of the paper's §4 (implemented as switches in
``vit.py``): attention probabilities treated as constants (AH rule), LayerNorm's 1/σ detached with
the centring kept (LN rule), element-wise activations by the identity rule and the SwiGLU product
by the uniform rule. The network is then a linear map of its input and of its additive terms
(biases, LayerNorm β, CLS/register tokens, positions), so Gradient × Input on this graph is LRP and

    f(x) = Σ_pixels R(x) + Σ_additive-terms b·∂f/∂b              (conservation)

holds exactly; ``conservation`` returns both sides so tests can check it.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from .encoder import Encoder
from .vit import VisionTransformer, pool_tokens


@contextlib.contextmanager
def conservative_rules(model: VisionTransformer):
    """Switch the ViT to the LRP forward rules; restores the model on exit (zennit-style)."""
    prev = model.lrp
    model.lrp = True
    try:
        yield model
    finally:
        model.lrp = prev


class Target:
    """The explained scalar per tile, f(z) for a pooled embedding z (B, dim) -> (B,).

    ``offset`` is the constant part of f (a probe's bias); it counts as an additive term in the
    conservation balance.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], offset: float = 0.0):
        self.fn, self.offset = fn, offset

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


def make_target(kind: str, index: int = 0, probe: tuple[torch.Tensor, torch.Tensor] | None = None,
                reference: torch.Tensor | None = None) -> Target:
    """``dim``: z[:, index]; ``probe``: (W z + b)[:, index] for a linear probe (W, b);
    ``similarity``: ⟨z, e⟩ with a detached reference embedding e (why are these two tiles close).
    """
    if kind == "dim":
        return Target(lambda z: z[:, index])
    if kind == "probe":
        if probe is None:
            raise ValueError("target 'probe' needs probe weights")
        W, b = probe
        return Target(lambda z: z @ W[index].to(z) + b[index].to(z), float(b[index]))
    if kind == "similarity":
        if reference is None:
            raise ValueError("target 'similarity' needs a reference embedding")
        e = reference.detach()
        return Target(lambda z: z @ e.to(z))
    raise ValueError(f"unknown target {kind!r}; use dim, probe or similarity")


def additive_terms(model: VisionTransformer) -> list[torch.nn.Parameter]:
    """Parameters that enter the network additively: biases, LN β, CLS/register tokens, positions."""
    terms = []
    for name, p in model.named_parameters():
        if name.endswith(".bias") or name in ("cls_token", "reg_token", "pos_embed"):
            terms.append(p)
    return terms


def lrp(encoder: Encoder, x01: torch.Tensor, target: Target, return_terms: bool = False):
    """Relevance of each pixel (B, H, W) for ``target(pool(φ(x)))``; x01 RGB in [0, 1].

    Relevance is computed on the normalised input (the model's own input space). With
    ``return_terms`` also returns (f(x), Σ relevance of additive terms) for conservation checks.
    """
    model = encoder.vit
    with torch.no_grad():
        xn = encoder.transform(x01.to(next(model.parameters()).dtype))
    xn = xn.clone().requires_grad_(True)
    terms = additive_terms(model) if return_terms else []
    was_training = model.training
    model.eval()
    with conservative_rules(model), torch.enable_grad():
        tokens = model.forward_features(xn)
        f = target(pool_tokens(tokens, model.num_prefix_tokens, encoder.pool))
        grads = torch.autograd.grad(f.sum(), [xn] + terms, allow_unused=True)
    model.train(was_training)
    relevance = (xn * grads[0]).sum(1).detach()
    if not return_terms:
        return relevance
    if x01.shape[0] != 1:
        raise ValueError("conservation terms are per tile; pass one tile")
    bias_rel = sum(float((p.detach() * g).sum()) for p, g in zip(terms, grads[1:]) if g is not None)
    bias_rel += getattr(target, "offset", 0.0)
    return relevance, float(f.detach().sum()), bias_rel


def patch_map(pixel_relevance: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sum relevance per P × P patch: (B, H, W) -> (B, H/P, W/P)."""
    return F.avg_pool2d(pixel_relevance.unsqueeze(1), patch_size).squeeze(1) * patch_size**2
