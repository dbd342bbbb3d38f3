"""Synthetic pyramidal slides with a planted signal (spec §5 recipe), for the demo and tests.

Each slide is a tiled, zlib-compressed pyramidal TIFF (top-level IFDs, SubfileType=1 for reduced
levels, resolution tags in cm), which OpenSlide opens as ``generic-tiff`` with ``openslide.mpp-x``;
``aperio=True`` writes an Aperio ``.svs`` description instead. Tissue is a pink textured ellipse;
positive slides carry a dark-purple "tumour" disc inside it. The ground truth (tissue mask and
signal mask at level 0, downsampled by ``mask_downsample``) is returned and written as PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def render_slide(width: int, height: int, positive: bool, seed: int = 0):
    """RGB image (H, W, 3) uint8, tissue mask and signal mask (H, W) bool."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width * rng.uniform(0.45, 0.55), height * rng.uniform(0.45, 0.55)
    ax, ay = width * rng.uniform(0.30, 0.36), height * rng.uniform(0.30, 0.36)
    tissue = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
    img = np.full((height, width, 3), 242, np.uint8)  # glass background
    # pink eosin-like stroma with texture
    noise = rng.normal(0, 25, (height // 4 + 1, width // 4 + 1, 1)) + rng.normal(0, 8, (height // 4 + 1, width // 4 + 1, 3))
    noise = np.repeat(np.repeat(noise, 4, 0), 4, 1)[:height, :width]
    pink = np.array([222, 150, 190], np.float32) + noise
    img[tissue] = np.clip(pink[tissue], 0, 255).astype(np.uint8)
    signal = np.zeros_like(tissue)
    if positive:
        r = min(ax, ay) * rng.uniform(0.35, 0.5)
        ang = rng.uniform(0, 2 * np.pi)
        sx, sy = cx + 0.4 * ax * np.cos(ang), cy + 0.4 * ay * np.sin(ang)
        signal = (((xx - sx) ** 2 + (yy - sy) ** 2) <= r * r) & tissue
        purple = np.array([100, 50, 150], np.float32) + noise
        img[signal] = np.clip(purple[signal], 0, 255).astype(np.uint8)
    return img, tissue, signal


def write_pyramid(path: str | Path, img: np.ndarray, mpp: float | None = 0.5, levels: int = 4,
                  aperio: bool = False, tile: int = 256) -> Path:
    """Write ``img`` as a tiled pyramidal TIFF that OpenSlide reads (with mpp when given)."""
    import tifffile

    path = Path(path)
    h, w = img.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(levels):
            f = 2 ** lvl
            extra = {}
            if mpp is not None:
                extra = dict(resolution=(1e4 / mpp / f, 1e4 / mpp / f), resolutionunit="CENTIMETER")
            if aperio and lvl == 0:  # the objective that gives this mpp (10 / mpp: 0.25 -> 40x, 0.5 -> 20x)
                app_mag = f"{10 / mpp:g}" if mpp is not None else "20"
                mpp_txt = f"|MPP = {mpp}" if mpp is not None else ""
                extra["description"] = (f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] "
                                        f"({tile}x{tile}) ZLIB |AppMag = {app_mag}{mpp_txt}")
            tw.write(np.ascontiguousarray(img[::f, ::f]), tile=(tile, tile), photometric="rgb",
                     compression="zlib", metadata=None, subfiletype=0 if lvl == 0 else 1, **extra)
    return path


def make_dataset(out: str | Path, n_slides: int = 8, width: int = 3072, height: int = 2048,
                 mpp: float = 0.5, seed: int = 0, aperio: bool = False, mask_downsample: int = 8) -> list[dict]:
    """Write ``n_slides`` slides (half positive), ``labels.csv`` and ground-truth masks."""
    from PIL import Image

    out = Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = []
    for i in range(n_slides):
        positive = i % 2 == 1
        name = f"slide_{i:03d}"
        img, tissue, signal = render_slide(width, height, positive, seed=seed * 1000 + i)
        suffix = ".svs" if aperio else ".tiff"
        write_pyramid(out / "slides" / f"{name}{suffix}", img, mpp=mpp, aperio=aperio)
        for kind, m in (("tissue", tissue), ("signal", signal)):
            Image.fromarray((m[::mask_downsample, ::mask_downsample] * 255).astype(np.uint8)).save(
                out / "masks" / f"{name}_{kind}.png")
        rows.append({"slide_id": name, "label": int(positive), "split": "test" if i >= n_slides - 2 else "train"})
    with open(out / "labels.csv", "w") as f:
        f.write("slide_id,label,split\n")
        for r in rows:
            f.write(f"{r['slide_id']},{r['label']},{r['split']}\n")
    return rows
