"""Attention rollout (Abnar & Zuidema, ACL 2020, arXiv 2005.00928, §3 eq. for Ã).

Per layer A_l (B, heads, T, T) is fused over heads (mean|max|min), the residual is modelled as
Â_l = 0.5·A_l + 0.5·I with rows renormalised, and R = Â_L ⋯ Â_1. The map is R[CLS, 1+R:] on the
patch grid; registers stay inside the products but out of the map (spec §2.9).
"""

from __future__ import annotations

import contextlib

import torch

from .vit import VisionTransformer


@contextlib.contextmanager
def keep_attention(model: VisionTransformer):
    """Make the blocks compute explicit softmax attention and keep it; restores the model on exit."""
    prev = model.keep_attention
    model.keep_attention = True
    try:
        yield model
    finally:
        model.keep_attention = prev
        model.attentions = []


def fuse_heads(attn: torch.Tensor, how: str = "mean") -> torch.Tensor:
    if how == "mean":
        return attn.mean(1)
    if how == "max":
        return attn.amax(1)
    if how == "min":
        return attn.amin(1)
    raise ValueError(f"head fusion must be mean, max or min, not {how!r}")


def rollout_matrix(attentions: list[torch.Tensor], head_fusion: str = "mean") -> torch.Tensor:
    """R = Â_L ⋯ Â_1 with Â = normrows(0.5·A + 0.5·I); (B, T, T), each row sums to 1."""
    result = None
    for attn in attentions:
        a = fuse_heads(attn.double(), head_fusion)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


@torch.no_grad()
def attention_rollout(model: VisionTransformer, x: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, 3, H, W) normalised input -> (B, H/P, W/P) rollout map from the CLS token."""
    P = model.cfg.patch_size
    gh, gw = x.shape[-2] // P, x.shape[-1] // P
    with keep_attention(model):
        model.forward_features(x)
        R = rollout_matrix(model.attentions, head_fusion)
    n_prefix = model.num_prefix_tokens
    return R[:, 0, n_prefix:].reshape(-1, gh, gw).float()
