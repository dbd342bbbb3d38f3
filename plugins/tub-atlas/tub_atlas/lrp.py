"""Conservative LRP for Vision Transformers (Ali et al., *XAI for Transformers: Better Explanations
through Conservative Propagation*, ICML 2022, arXiv 2202.07304; spec §2.9).

The forward pass is re-run with the rules of the paper's §4 (implemented as switches in
``vit.py``): attention probabilities treated as constants (AH rule), LayerNorm's 1/σ detached with
the centring kept (LN rule), element-wise activations by the identity rule and the SwiGLU product
by the uniform rule. The network is then a linear map of its input and of its additive terms
(biases, LayerNorm β, CLS/register tokens, positions), so Gradient × Input on this graph is LRP and

    f(x) = Σ_pixels R(x) + Σ_additive-terms b·∂f/∂b              (conservation)

holds exactly; ``lrp(..., return_terms=True)`` returns both sides so tests can check it.

``rule="attn"`` gives AttnLRP (Achtibat et al., *AttnLRP: Attention-Aware Layer-Wise Relevance
Propagation for Transformers*, ICML 2024, arXiv 2402.05602) on the same Gradient × Input footing:
LayerNorm by the identity rule on 1/σ (Prop. 3.4, Eq. 9), linear layers by the ε-rule (Eq. 8) in
its ε → 0 limit (Gradient × Input needs no division, hence no stabiliser), GELU/SiLU by the
identity rule (Eq. 9), the SwiGLU product by the uniform rule (Prop. 3.2, Eq. 7), and, unlike
CP-LRP, relevance through the attention: uniform ε-rule for q·kᵀ and attention·value
(Prop. 3.3) and the softmax rule R_in = x ⊙ (R_out − s Σ R_out) (Prop. 3.1). The softmax rule is
a Taylor expansion *with bias*: the bias β = s − J x keeps part of the relevance, so AttnLRP
conserves

    f(x) = Σ_pixels R(x) + Σ_additive-terms b·∂f/∂b + Σ_softmax β·∂f/∂s

(``relevance_budget`` returns every part), not the first two terms alone.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from .encoder import Encoder
from .vit import VisionTransformer, pool_tokens


RULES = ("cp", "attn")  # conservative LRP (Ali et al. 2022) | AttnLRP (Achtibat et al. 2024)


@contextlib.contextmanager
def lrp_rules(model: VisionTransformer, rule: str = "cp"):
    """Switch the ViT to the LRP forward rules of ``rule``; restores the model on exit (zennit-style)."""
    if rule not in RULES:
        raise ValueError(f"unknown LRP rule set {rule!r}; use cp or attn")
    prev = model.lrp
    model.lrp = True if rule == "cp" else "attn"
    try:
        yield model
    finally:
        model.lrp = prev
        for blk in model.blocks:
            blk.attn.softmax_bias = None


def conservative_rules(model: VisionTransformer):
    """CP-LRP forward rules (Ali et al. 2022), see ``lrp_rules``."""
    return lrp_rules(model, "cp")


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


def relevance_budget(encoder: Encoder, x01: torch.Tensor, target: Target, rule: str = "cp") -> dict:
    """LRP of ``target(pool(φ(x)))`` with its full balance sheet (scalars summed over the batch).

    Returns ``pixels`` (B, H, W) relevance on the normalised input (the model's own input space)
    and the scalars ``f`` (the explained output), ``input`` (Σ pixels), ``additive`` (biases, LN β,
    CLS/registers, positions, a probe's bias) and ``softmax`` (what AttnLRP's softmax rule keeps in
    its Taylor bias; 0 for CP-LRP). f = input + additive + softmax up to rounding. Works on frozen
    encoders too (``requires_grad`` of the additive terms is switched on for the pass and restored).
    """
    model = encoder.vit
    with torch.no_grad():
        xn = encoder.preprocess(x01)
    xn = xn.clone().requires_grad_(True)
    terms = additive_terms(model)
    frozen = [p for p in terms if not p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with lrp_rules(model, rule), torch.enable_grad():
            tokens = model.forward_features(xn)
            f = target(pool_tokens(tokens, model.num_prefix_tokens, encoder.pool))
            betas = [blk.attn.softmax_bias for blk in model.blocks if blk.attn.softmax_bias is not None]
            grads = torch.autograd.grad(f.sum(), [xn] + terms + betas, allow_unused=True)
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
    relevance = (xn * grads[0]).sum(1).detach()
    n = len(terms)

    def share(leaves, gs):
        return sum(float((p.detach() * g).sum()) for p, g in zip(leaves, gs) if g is not None)

    return {"pixels": relevance, "f": float(f.detach().sum()), "input": float(relevance.sum()),
            "additive": share(terms, grads[1:1 + n]) + getattr(target, "offset", 0.0) * x01.shape[0],
            "softmax": share(betas, grads[1 + n:])}


def lrp(encoder: Encoder, x01: torch.Tensor, target: Target, return_terms: bool = False, rule: str = "cp"):
    """Relevance of each pixel (B, H, W) for ``target(pool(φ(x)))``; x01 RGB in [0, 1].

    ``rule``: ``cp`` (conservative LRP, Ali et al. 2022) or ``attn`` (AttnLRP, Achtibat et al. 2024).
    Relevance is computed on the normalised input (the model's own input space). With
    ``return_terms`` also returns (f(x), relevance of everything that is not a pixel: additive terms
    and, for AttnLRP, the softmax biases) for conservation checks.
    """
    if not return_terms:
        return relevance_budget(encoder, x01, target, rule)["pixels"]
    if x01.shape[0] != 1:
        raise ValueError("conservation terms are per tile; pass one tile")
    b = relevance_budget(encoder, x01, target, rule)
    return b["pixels"], b["f"], b["additive"] + b["softmax"]


def patch_map(pixel_relevance: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sum relevance per P × P patch: (B, H, W) -> (B, H/P, W/P)."""
    return F.avg_pool2d(pixel_relevance.unsqueeze(1), patch_size).squeeze(1) * patch_size**2
