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


def colour_range(heat: np.ndarray, signed: bool) -> tuple[float, float]:
    """The map values at the two ends of the colour scale (each tile's own: recorded in the manifest so that
    overlays can be compared): ±max|R| for signed relevance, the map's min and max otherwise."""
    if signed:
        m = float(np.abs(heat).max()) or 1.0
        return -m, m
    return float(heat.min()), float(heat.max())


def colourise(heat: np.ndarray, signed: bool) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8: ``bwr`` centred on 0 for signed relevance, ``inferno`` otherwise, over
    :func:`colour_range`."""
    from matplotlib import colormaps

    lo, hi = colour_range(heat, signed)
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    rgba = colormaps["bwr" if signed else "inferno"](norm)
    return (rgba[..., :3] * 255).astype(np.uint8)


def overlay(tile: np.ndarray, heat: np.ndarray, signed: bool, alpha: float = 0.5, box=None) -> np.ndarray:
    """Three panels side by side: the tile, the colourised map blended over it, and the map alone (on
    white outside ``box``): blended, negative relevance in blue cannot be told from haematoxylin.

    ``box`` (top, left, height, width in tile pixels; ``Transform.seen_box``) is the part of the tile
    the map covers (a centre-cropping model sees only the middle of a non-square tile); the rest of
    the tile is shown without heat. Default: the whole tile."""
    H, W = tile.shape[:2]
    top, left, h, w = box if box is not None else (0, 0, H, W)
    r0, c0 = int(round(top)), int(round(left))
    r1, c1 = min(H, int(round(top + h))), min(W, int(round(left + w)))
    blend = tile.copy()
    colour = colourise(upsample(heat, (r1 - r0, c1 - c0)), signed)
    region = tile[r0:r1, c0:c1].astype(float)
    blend[r0:r1, c0:c1] = ((1 - alpha) * region + alpha * colour.astype(float)).astype(np.uint8)
    alone = np.full_like(tile, 255)
    alone[r0:r1, c0:c1] = colour
    return np.concatenate([tile, blend, alone], axis=1)


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    from tubcli.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
