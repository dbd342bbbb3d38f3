"""Rendering patch scores: PNG overlay on the thumbnail and QuPath GeoJSON (spec §2.7 Rendering).

Scores are clipped to the boxplot whiskers (most extreme data within 1.5 IQR; magnitudes for signed
scores; never more than the 1% most extreme per side); signed scores use
``coolwarm`` with (s + max|s|) / (2 max|s|) so 0 is neutral; unsigned use ``Reds`` min-max. Patch
rectangles are filled on a black canvas, and the canvas is blended onto the thumbnail with opacity
alpha = 64/255 (overlay = (1 - alpha) thumbnail + alpha canvas). GeoJSON: one level-0 square
Polygon per tile with the score as a measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def whisker_clip(s: np.ndarray, keep_percent: float = 1.0) -> np.ndarray:
    """Clip to the boxplot whiskers (most extreme data within 1.5 IQR), but never clip more than the
    ``keep_percent`` % most extreme scores on a side: sparse maps (a few relevant tiles, IQR ~ 0)
    would otherwise lose exactly the tiles that matter."""
    q1, q3 = np.percentile(s, [25, 75])
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    inside = s[(s >= lo) & (s <= hi)]
    if inside.size == 0:
        return s
    p_lo, p_hi = np.percentile(s, [keep_percent, 100 - keep_percent])
    return np.clip(s, min(inside.min(), p_lo), max(inside.max(), p_hi))


def normalise(scores: np.ndarray, signed: bool) -> np.ndarray:
    """Scores to [0, 1] colour values; a non-finite score (overflow) stays NaN and is not drawn, and the
    others are scaled among themselves (one NaN made every tile NaN, a black map)."""
    s = np.asarray(scores, float)
    finite = np.isfinite(s)
    if not finite.all():
        out = np.full_like(s, np.nan)
        if finite.any():
            out[finite] = normalise(s[finite], signed)
        return out
    if signed:  # clip magnitudes, so that clipping never flips or moves a score across 0
        s = np.sign(s) * whisker_clip(np.abs(s))
    else:
        s = whisker_clip(s)
    if signed:
        m = np.abs(s).max()
        return np.full_like(s, 0.5) if m == 0 else (s + m) / (2 * m)
    lo, hi = s.min(), s.max()
    return np.zeros_like(s) if hi == lo else (s - lo) / (hi - lo)


def tile_boxes(coords: np.ndarray, size_level0: int, downsample: float) -> np.ndarray:
    """Integer pixel boxes (x0, y0, x1, y1) of level-0 tiles on an image ``downsample`` x smaller.

    Boxes are clipped at 0: a tile with a negative level-0 corner (padded tiling) would otherwise be
    sliced as heat[y0:y1, -2:6], an empty slice, and vanish from the PNG. A tile wholly left of or
    above the canvas gets an empty box. Slicing clips the right and bottom edges."""
    c = np.asarray(coords, float)
    x0 = np.floor(c[:, 0] / downsample).astype(int)
    y0 = np.floor(c[:, 1] / downsample).astype(int)
    x1 = np.maximum(np.floor((c[:, 0] + size_level0) / downsample).astype(int), x0 + 1)
    y1 = np.maximum(np.floor((c[:, 1] + size_level0) / downsample).astype(int), y0 + 1)
    return np.stack([np.maximum(x0, 0), np.maximum(y0, 0), np.maximum(x1, 0), np.maximum(y1, 0)], 1)


def render_overlay(thumb: np.ndarray, coords: np.ndarray, scores: np.ndarray, size_level0: int,
                   downsample: float, signed: bool, alpha: float = 64 / 255):
    """(overlay RGB uint8, heat RGB uint8 on black) at the thumbnail's resolution."""
    import matplotlib

    cmap = matplotlib.colormaps["coolwarm" if signed else "Reds"]
    v = normalise(scores, signed)
    colors = (np.asarray(cmap(v))[:, :3] * 255).astype(np.uint8)
    h, w = thumb.shape[:2]
    heat = np.zeros((h, w, 3), np.uint8)
    for (x0, y0, x1, y1), col, drawn in zip(tile_boxes(coords, size_level0, downsample), colors, np.isfinite(v)):
        if drawn:
            heat[y0:y1, x0:x1] = col
    # spec §2.7: the black canvas with its tiles is blended onto the thumbnail with opacity alpha,
    # so the tissue stays readable under the colours (and unscored areas dim by alpha)
    over = (1 - alpha) * thumb.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.rint(over).clip(0, 255).astype(np.uint8), heat


def geojson(coords: np.ndarray, scores: np.ndarray, size_level0: int, method: str,
            size_source: str | None = None, origin: tuple[int, int] = (0, 0)) -> dict:
    """QuPath-importable FeatureCollection of tile polygons with a score measurement.

    The polygons are in QuPath's pixel frame: level-0 coordinates minus ``origin``, the slide's
    openslide.bounds-x/-y (QuPath shows a slide that records bounds, as MRXS do, cropped to them); the
    collection's ``properties`` keep that origin, so level-0 = polygon + origin.

    A non-finite score is left out of the tile's measurements: strict JSON has no NaN, and QuPath reads a
    null measurement as an error, a missing one as NaN.
    ``size_source`` (where the tile side came from) goes into the collection's ``properties``, so a
    reviewer sees when the polygons' size was only inferred from the coordinate grid."""
    feats = []
    ox, oy = (int(v) for v in origin)
    for i, ((x, y), s) in enumerate(zip((np.asarray(coords, int) - [ox, oy]).tolist(),
                                        np.asarray(scores, float).tolist())):
        ring = [[x, y], [x + size_level0, y], [x + size_level0, y + size_level0], [x, y + size_level0], [x, y]]
        feats.append({"type": "Feature", "id": str(i),
                      "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "tile", "name": f"patch {i}",
                                     "measurements": {f"xmil_{method}": s} if np.isfinite(s) else {}}})
    out = {"type": "FeatureCollection", "features": feats,
           "properties": {"patch_size_level0": int(size_level0), "origin_level0": [ox, oy]}}
    if size_source is not None:
        out["properties"]["patch_size_level0_source"] = size_source
    return out


def geojson_coords(data: dict) -> np.ndarray:
    """Top-left level-0 corners back from a GeoJSON written by :func:`geojson`."""
    origin = data.get("properties", {}).get("origin_level0", [0, 0])
    corners = np.asarray([f["geometry"]["coordinates"][0][0] for f in data["features"]], np.int64)
    return corners + np.asarray(origin, np.int64)


def write_heatmap(out_dir: Path, name: str, thumb, coords, scores, size_level0, downsample, signed, method,
                  size_source: str | None = None, origin: tuple[int, int] = (0, 0)):
    """Write ``{name}_{method}.png`` (overlay), ``{name}_{method}_heat.png`` and ``.geojson``
    atomically; returns the paths. The GeoJSON is strict JSON (``tubcli.io.to_json``: NaN -> null)."""
    from PIL import Image
    from tubcli.io import atomic_path, to_json

    over, heat = render_overlay(thumb, coords, scores, size_level0, downsample, signed)
    paths = {"overlay": out_dir / f"{name}_{method}.png", "heat": out_dir / f"{name}_{method}_heat.png",
             "geojson": out_dir / f"{name}_{method}.geojson"}
    with atomic_path(paths["heat"]) as tmp:
        Image.fromarray(heat).save(tmp, format="PNG")
    with atomic_path(paths["geojson"]) as tmp:
        Path(tmp).write_text(to_json(geojson(coords, scores, size_level0, method, size_source, origin)))
    with atomic_path(paths["overlay"]) as tmp:
        Image.fromarray(over).save(tmp, format="PNG")
    return paths
