"""Tissue detection and the patch grid (spec §2.7 Tiling).

Tissue: Otsu's threshold (Otsu 1979) on the HSV saturation of a thumbnail level; a grid of
``patch_size`` px tiles at ``target_mpp`` (level-0 side = patch_size * target_mpp / mpp) keeps tiles
whose tissue fraction >= ``min_tissue`` and whose thumbnail pixels have grey std >= ``min_std``.
Coordinates are level-0 top-left corners, written like TRIDENT/CLAM ``patches/*.h5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.images import check_thumbnail_level, looks_greyscale


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Threshold maximising the between-class variance of a uint8-range histogram."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0, 256))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..255 (max - min) / max."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0) * 255


def tissue_mask(thumb: np.ndarray, min_saturation: float = 8.0, median: int = 7, close: int = 4) -> np.ndarray:
    """Otsu on the median-blurred saturation, then a morphological closing (CLAM's ``mthresh`` 7 and
    ``close`` 4, Lu et al. 2021): pale speckle inside tissue (nuclei-free stroma, small lumina) stays
    tissue and isolated coloured specks on the glass do not count; thumbnails with no contrast give an
    empty mask."""
    from scipy import ndimage

    s = saturation(thumb)
    if median > 1:
        s = ndimage.median_filter(s, size=median, mode="nearest")
    t = max(otsu_threshold(s), min_saturation)
    mask = s > t
    if close > 1 and mask.any():  # padded by background, so the border neither erodes tissue nor fills the edge
        st = np.ones((close, close), bool)
        mask = ndimage.binary_erosion(ndimage.binary_dilation(np.pad(mask, close), st), st)[close:-close, close:-close]
    return mask


@dataclass
class Tiling:
    coords: np.ndarray          # (n, 2) int64 level-0 top-left (x, y)
    patch_size: int             # px at target mpp
    patch_size_level0: int
    mpp: float
    target_mpp: float
    level0_width: int
    level0_height: int
    thumbnail: np.ndarray       # RGB
    mask: np.ndarray            # bool, thumbnail resolution
    thumb_downsample: float
    min_tissue: float           # the tissue filter that kept these tiles
    min_std: float
    read_level: int = 0         # the pyramid level the tiles are read at (CLAM's patch_level) ...
    read_downsample: float = 1.0
    read_size: int = 0          # ... and their side there, before resizing to patch_size
    read_level_dim: tuple = (0, 0)
    bounds: tuple = (0, 0)      # openslide.bounds-x/-y: QuPath's image origin in level-0 px


def thumbnail_level(slide, patch_size_level0: int, min_px_per_tile: int = 8) -> int:
    """Deepest level at which one tile still spans >= ``min_px_per_tile`` pixels."""
    best = 0
    for lvl, ds in enumerate(slide.level_downsamples):
        if patch_size_level0 / ds >= min_px_per_tile:
            best = lvl
    return best


def tile_slide(slide, mpp: float, target_mpp: float = 0.5, patch_size: int = 256,
               min_tissue: float = 0.5, min_std: float = 8.0, name: str = "slide") -> Tiling:
    from tub_xmil.slides import read_level, slide_bounds

    if target_mpp < 0.95 * mpp:  # the tiles would be upsampled: detail the scan does not hold
        raise TubError(f"{name}: --target-mpp {target_mpp:g} is finer than the slide's {mpp:g} µm/px by more than "
                       f"5% (the tiles would be upsampled); use --target-mpp {mpp:g} or coarser")
    size0 = int(round(patch_size * target_mpp / mpp))
    if size0 < 1:
        raise TubError(f"{name}: a {patch_size} px tile at {target_mpp} mpp is < 1 px at the slide's {mpp} mpp; "
                       "check --mpp or raise tiling.patch_size / tiling.target_mpp")
    W, H = slide.dimensions
    if W < size0 or H < size0:  # not a tissue problem: no tile fits at all
        raise TubError(f"{name}: the slide ({W}x{H} px at {mpp} mpp) is smaller than one {size0} px tile "
                       f"({patch_size} px at {target_mpp} mpp); lower tiling.patch_size or tiling.target_mpp")
    lvl = thumbnail_level(slide, size0)
    ds = slide.level_downsamples[lvl]
    lw, lh = slide.level_dimensions[lvl]
    check_thumbnail_level(name, lw, lh)
    region = slide.read_region((0, 0), lvl, (lw, lh))
    from PIL import Image
    bg = Image.new("RGB", region.size, (255, 255, 255))
    bg.paste(region, mask=region.split()[3])
    thumb = np.asarray(bg)
    mask = tissue_mask(thumb)
    grey = thumb.astype(np.float32).mean(-1)
    coords = []
    for y in range(0, H - size0 + 1, size0):
        for x in range(0, W - size0 + 1, size0):
            x0, y0 = int(x / ds), int(y / ds)
            x1, y1 = max(x0 + 1, int(round((x + size0) / ds))), max(y0 + 1, int(round((y + size0) / ds)))
            m = mask[y0:y1, x0:x1]
            if m.size == 0 or m.mean() < min_tissue:
                continue
            if grey[y0:y1, x0:x1].std() < min_std:
                continue
            coords.append((x, y))
    if not coords and looks_greyscale(thumb, min_std):  # saturation 0 everywhere, yet something is there
        raise TubError(f"{name}: the slide has no colour (greyscale), so tissue detection, which thresholds "
                       "saturation, cannot see tissue; tile it with another tool and give its patches files to "
                       "'tub xmil features --coords-dir'")
    if not coords:
        raise TubError(f"{name}: no tissue found (Otsu on saturation kept no tile); check the slide "
                       "or lower --set tiling.min_tissue")
    level, level_ds, read_size = read_level(slide, size0, patch_size)
    return Tiling(np.asarray(coords, np.int64), patch_size, size0, mpp, target_mpp, W, H, thumb, mask, ds,
                  float(min_tissue), float(min_std), level, level_ds, read_size,
                  tuple(int(v) for v in slide.level_dimensions[level]), slide_bounds(slide))


# how the tiles were cut (TRIDENT and CLAM names, plus tub's tissue filter); features .h5 files carry them on, too
TILING_KEYS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
               "level0_width", "level0_height", "mpp", "target_mpp", "patch_level", "downsample", "level_dim",
               "downsampled_level_dim", "read_size", "bounds_x", "bounds_y", "min_tissue", "min_std")


def tiling_attrs(t: Tiling) -> dict:
    return {"patch_size": t.patch_size, "patch_size_level0": t.patch_size_level0,
            "level0_magnification": 10.0 / t.mpp, "target_magnification": 10.0 / t.target_mpp,
            "overlap": 0, "level0_width": t.level0_width, "level0_height": t.level0_height,
            "mpp": t.mpp, "target_mpp": t.target_mpp,
            # CLAM: the level the tiles are read at (coords stay level 0) with its downsample and size;
            # read_size is the side read there (CLAM's readers take patch_size, equal to it whenever the
            # pyramid has a level at the target resolution, as 0.25 -> 0.5 µm/px at level 1)
            "patch_level": t.read_level, "downsample": [t.read_downsample, t.read_downsample],
            "level_dim": list(t.read_level_dim), "downsampled_level_dim": list(t.read_level_dim),
            "read_size": t.read_size, "bounds_x": t.bounds[0], "bounds_y": t.bounds[1],
            "min_tissue": t.min_tissue, "min_std": t.min_std}


def write_patches_h5(path: str | Path, t: Tiling, name: str) -> None:
    """TRIDENT-style ``coords`` (int64, level 0) with TRIDENT and CLAM attributes."""
    import h5py

    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=t.coords)
        for k, v in {**tiling_attrs(t), "name": name}.items():
            d.attrs[k] = v
            f.attrs[k] = v


def read_coords_h5(path: str | Path) -> tuple[np.ndarray, dict]:
    """Coordinates and attributes from a tub, TRIDENT or CLAM patches/features ``.h5``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise TubError(f"{Path(path).name}: no 'coords' dataset; expected a CLAM/TRIDENT patches file")
            ds = f["coords"]
            coords = int_coords(ds[:])
            attrs = {**{k: _py(v) for k, v in f.attrs.items()}, **{k: _py(v) for k, v in ds.attrs.items()}}
    except OSError as exc:
        raise TubError(f"{Path(path).name}: not a readable HDF5 file ({str(exc)[:80]})") from None
    return coords, with_level0_size(attrs)


def int_coords(values) -> np.ndarray:
    """(n, 2) int64 pixel coords, float values rounded to the nearest pixel: casting would truncate
    (127.6 -> 127) and shift every tile of a float-coords file up-left by up to a pixel."""
    a = np.asarray(values).reshape(-1, 2)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64)
    return np.rint(a.astype(np.float64)).astype(np.int64)


def with_level0_size(attrs: dict) -> dict:
    """``attrs`` plus ``patch_size_level0`` (see :func:`size_from_attrs`) where the attributes tell it."""
    size = size_from_attrs(attrs)
    if size is not None:
        attrs["patch_size_level0"] = size
    return attrs


def size_from_attrs(attrs: dict) -> int | None:
    """Level-0 tile side from coords attributes, the one conversion every reader uses.

    TRIDENT and tub write ``patch_size_level0``. CLAM's ``patch_size`` is the size at ``patch_level``,
    so at level > 0 it is scaled by that level's ``downsample`` (coords are level 0 either way).
    None when the attributes do not say (CLAM ``h5_files``, ``.npz``)."""
    if attrs.get("patch_size_level0"):
        return int(round(float(attrs["patch_size_level0"])))
    if not attrs.get("patch_size"):
        return None
    ds = attrs.get("downsample", 1.0) if attrs.get("patch_level") else 1.0
    ds = float(np.ravel(ds)[0]) if np.ndim(ds) else float(ds)
    return int(round(float(attrs["patch_size"]) * ds))


def size_from_grid(coords: np.ndarray) -> int | None:
    """Level-0 tile side read off a regular, non-overlapping grid of top-left corners: the smallest
    positive spacing of the x and of the y values, which must agree (one axis suffices when the tiles
    lie in one row or column) and divide every offset from the first corner. None when ambiguous."""
    c = np.asarray(coords, np.int64).reshape(-1, 2)
    steps = []
    for axis in (0, 1):
        d = np.diff(np.unique(c[:, axis]))
        if len(d):
            steps.append(int(d.min()))
    if not steps or len(set(steps)) != 1:
        return None
    step = steps[0]
    if ((c - c.min(0)) % step).any():  # off-grid tiles: the spacing is not the tile size
        return None
    return step


# where a bag's level-0 tile size came from; recorded in heatmap outputs (_scores.json, GeoJSON)
SIZE_FROM_OVERRIDE = "--patch-size-level0"
SIZE_FROM_ATTRIBUTE = "attribute"
SIZE_FROM_GRID = "inferred from the coordinate grid"


def tile_size_level0_source(attrs: dict, coords: np.ndarray | None = None, override: int | None = None,
                            name: str = "bag", log=None) -> tuple[int, str]:
    """(level-0 tile side, its source): ``override`` (what the user stated) wins, then the coords
    attributes (:func:`size_from_attrs`), then the coordinate grid (:func:`size_from_grid`); a
    TubError when none of them tells.

    The grid inference assumes adjacent tiles: sparse (stride > size) or overlapping tiles make it
    silently wrong, so it is a WARNING, and the source goes into the outputs for a reviewer. A size
    that a tub ``--coords-dir`` run itself inferred keeps that source (``patch_size_level0_source``)."""
    import logging

    log = log or logging.getLogger("tub")
    found = size_from_attrs(attrs)
    if override is not None:
        if found is not None and found != int(override):
            log.warning("%s: --patch-size-level0 %d overrides the file's tile size %d", name, override, found)
        return int(override), SIZE_FROM_OVERRIDE
    if found is not None:
        recorded = attrs.get("patch_size_level0_source")
        if recorded == SIZE_FROM_GRID and attrs.get("patch_size_level0"):
            return found, f"{SIZE_FROM_ATTRIBUTE} ({SIZE_FROM_GRID} when the features were extracted)"
        return found, SIZE_FROM_ATTRIBUTE
    step = size_from_grid(coords) if coords is not None and len(coords) else None
    if step is None:
        raise TubError(f"{name}: tile size unknown (no patch_size_level0/patch_size attribute, and the coords "
                       "are not one regular grid); pass --patch-size-level0 N (tile side in level-0 pixels)")
    log.warning("%s: no tile-size attribute; level-0 tile size %d px inferred from the coordinate grid "
                "(tiles assumed adjacent, no overlap: wrong for sparse or overlapping tiles; pass "
                "--patch-size-level0 to state it)", name, step)
    return step, SIZE_FROM_GRID


def _py(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v
