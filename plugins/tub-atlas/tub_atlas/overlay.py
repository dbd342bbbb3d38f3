"""Heatmap overlays as PNG: a map on the patch or pixel grid, upsampled and blended over the tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a (h, w) map to the tile size."""
    t = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t[0, 0].numpy()


def colourise(heat: np.ndarray, signed: bool) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8: ``bwr`` centred on 0 for signed relevance, ``inferno`` otherwise."""
    from matplotlib import colormaps

    if signed:
        m = float(np.abs(heat).max()) or 1.0
        norm = 0.5 + 0.5 * heat / m
        rgba = colormaps["bwr"](norm)
    else:
        lo, hi = float(heat.min()), float(heat.max())
        norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        rgba = colormaps["inferno"](norm)
    return (rgba[..., :3] * 255).astype(np.uint8)


def overlay(tile: np.ndarray, heat: np.ndarray, signed: bool, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised map over an (H, W, 3) uint8 tile, side by side with the tile itself."""
    H, W = tile.shape[:2]
    colour = colourise(upsample(heat, (H, W)), signed)
    blend = ((1 - alpha) * tile.astype(float) + alpha * colour.astype(float)).astype(np.uint8)
    return np.concatenate([tile, blend], axis=1)


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    from tubcli.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
