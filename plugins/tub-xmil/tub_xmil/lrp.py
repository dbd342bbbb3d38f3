"""xMIL-LRP as block-wise gradient x input.

Hense et al., *xMIL: Insightful Explanations for Multiple Instance Learning in Histopathology*,
NeurIPS 2024 (arXiv:2406.04280), §3 and App. A; Jamshidi Idaji et al. arXiv:2603.08328, §2.

A model is explained as a chain of blocks. Each block maps its (detached) input ``a`` to its real
output ``y`` and, where an LRP rule changes the linear map (gamma rule, ``no_bias``), to a modified
output ``y_p``. Relevance R at a block's output is redistributed as

    y_rel = y_p * stopgrad(R / (y_p + eps * sgn(y_p))),      R_in = a * d y_rel / d a,

with sgn(0) = +1 and NaN gradients set to 0. Rules that are not linear maps (AH rule for attention
pooling, LN rule, the Mamba rules) are written into the blocks' forward by detaching the
non-linear factors (attention weights, the LayerNorm std, gates), so that gradient x input on the
block equals the rule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LRPParams:
    """gamma (W <- W + gamma W+), eps (stabiliser), no_bias (drop biases in the rule)."""

    gamma: float = 0.0
    eps: float = 1e-8
    no_bias: bool = True


def sgn_eps(x: torch.Tensor, eps: float) -> torch.Tensor:
    """eps * sgn(x) with sgn(0) = +1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype) * eps


def gamma_module(layer: nn.Module, gamma: float, no_bias: bool) -> nn.Module:
    """A copy of a Linear/Conv layer with W + gamma W+ and bias 0 (no_bias) or b + gamma b+ (gamma rule)."""
    rho = lambda p: p + gamma * p.clamp(min=0)  # noqa: E731
    new = copy.deepcopy(layer)
    with torch.no_grad():
        new.weight.copy_(rho(layer.weight))
        if layer.bias is not None:
            new.bias.copy_(layer.bias * 0 if no_bias else rho(layer.bias))
    return new


def layer_norm_rule(x: torch.Tensor, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """LN rule: (x - mean) / (std.detach() + eps sgn) * w + b, with the **unbiased** std and eps
    outside the root (xMIL, after Ali et al. 2022, *XAI for Transformers*, Eq. 9)."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True).detach()
    return (x - mean) / (std + sgn_eps(std, eps)) * weight + bias


# the output relevance LRP starts from when none is asked for (``lrp.explained_rel`` is for classification)
DEFAULT_OUTPUT_RELEVANCE = {"classification": "logit", "regression": "logit", "survival": "survival"}


def output_relevance(logits: torch.Tensor, mode: str, target: int | None,
                     contrastive: int | None = None) -> torch.Tensor:
    """Relevance put on the output layer (spec §2.3).

    ``logit``: z_c, other classes zeroed. ``softmax``: R = z * d p_c / d z, i.e. R_k = -z_k p_k p_c
    (k != c) and R_c = z_c p_c (1 - p_c). ``contrastive`` (Montavon et al. 2019, *Layer-wise relevance
    propagation: an overview*, p. 202): the evidence for c against the others, eta_c = log p_c / (1 - p_c)
    = -log sum_k exp(-(z_c - z_k)), a soft minimum of the differences z_c - z_k; each difference gets the
    softmin weight w_k = softmax_k(-(z_c - z_k)), so R_c = z_c, R_k = -w_k z_k and the total is
    sum_k w_k (z_c - z_k) (two classes: z_c - z_k). With ``contrastive`` = k only that difference
    (w_k = 1). The reference code rescales [z_c, -z_k] by sum exp(-R) / sum exp(-(z_c - z_k)), which
    does not sum to any of these; tub follows the paper. ``survival``: R = z * d risk / d z with
    risk = -sum_k prod_{t<=k} (1 - sigma(z_t)).
    """
    logits = logits.detach().clone()
    n = logits.shape[1]
    others = [k for k in range(n) if k != target]
    if mode == "logit":
        rel = logits
        if others:
            rel[:, others] = 0
        return rel
    if mode == "softmax":
        p = logits.softmax(-1)
        pc = p[:, target][:, None]
        rel = -logits * p * pc
        rel[:, target] += logits[:, target] * pc[:, 0]
        return rel
    if mode == "contrastive":
        if not others:
            raise ValueError("contrastive relevance needs at least two classes")
        weights = torch.zeros_like(logits)
        if contrastive is not None:
            weights[:, contrastive] = 1.0
        else:  # softmin over the differences z_c - z_k
            weights[:, others] = torch.softmax(-(logits[:, target:target + 1] - logits[:, others]), dim=-1)
        rel = -weights * logits
        rel[:, target] = logits[:, target]
        return rel
    if mode == "survival":
        z = logits.clone().requires_grad_(True)
        with torch.enable_grad():
            risk = -torch.cumprod(1 - torch.sigmoid(z), dim=1).sum(1)
            (g,) = torch.autograd.grad(risk.sum(), z)
        return logits * g
    raise ValueError(f"unknown output relevance {mode!r}")


Block = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def lrp_chain(blocks: list[tuple[str, Block]], x: torch.Tensor, relevance_out: Callable,
              eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Run ``blocks`` forward on ``x`` and propagate relevance backwards block by block.

    Returns (input relevance with the shape of x, relevance at every block input, real output).
    """
    inputs, outs = [], []
    a = x.detach()
    with torch.enable_grad():
        for _, block in blocks:
            a_leaf = a.detach().requires_grad_(True)
            y, y_p = block(a_leaf)
            inputs.append(a_leaf)
            outs.append((y, y_p))
            a = y.detach()
        out = outs[-1][0].detach()
        R = relevance_out(out)
        rels: dict[str, torch.Tensor] = {"out": R}
        for (name, _), a_leaf, (y, y_p) in zip(reversed(blocks), reversed(inputs), reversed(outs)):
            z = y_p if y_p is not None else y
            y_rel = z * (R / (z + sgn_eps(z, eps))).detach()
            (g,) = torch.autograd.grad(y_rel.sum(), a_leaf, allow_unused=True)
            g = torch.zeros_like(a_leaf) if g is None else torch.nan_to_num(g, nan=0.0)
            R = (g * a_leaf).detach()
            rels[name] = R
    return R, rels, out


def linear_block(layer: nn.Linear, params: LRPParams, act: Callable | None = F.relu) -> Block:
    """Linear (+ activation) with the gamma/eps rule: y = act(W a + b), y_p = W' a + b'."""
    if params.gamma == 0:  # the modified map is W a (+ b): one matmul serves both outputs
        def block(a):
            z = F.linear(a, layer.weight)
            b = layer.bias
            y = z if b is None else z + b
            y_p = z if (b is None or params.no_bias) else y
            return (act(y) if act is not None else y), y_p

        return block
    mod = gamma_module(layer, params.gamma, params.no_bias)

    def block(a):
        y = layer(a)
        return (act(y) if act is not None else y), mod(a)

    return block
