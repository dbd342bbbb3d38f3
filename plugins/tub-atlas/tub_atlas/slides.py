"""Whole-slide images as tile sets: OpenSlide pyramid -> tissue mask -> grid of tissue tiles.

The usual CLAM / TRIDENT patching, reimplemented for ``embed``:

1. **Level and tile footprint.** With a target resolution ``mpp`` (microns per pixel) the tile
   covers ``tile_px * mpp / mpp0`` level-0 pixels (mpp0 from the slide's ``openslide.mpp-x``) and is
   read from the deepest level whose downsample does not exceed that factor, then resized to
   ``tile_px`` (bilinear, antialiased). Without ``mpp`` tiles are ``tile_px`` pixels of ``level``.
2. **Tissue mask** on a thumbnail: saturation of HSV, Otsu threshold (tissue is coloured, glass and
   background are grey/white); a grid cell is kept when its tissue fraction is >= ``tissue_min``.
3. **Coordinates** are level-0 pixels of each tile's top-left corner, as in CLAM/TRIDENT h5 files;
   the non-overlapping grid starts at (0, 0) and drops partial cells at the right/bottom edge.

Pixels outside the scanned area (alpha 0 in ``read_region``) become white.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.errors import TubError

SLIDE_EXT = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff"}


def is_whole_slide(path: Path) -> bool:
    """True for files OpenSlide opens as slides (a plain single-image TIFF tile is not one)."""
    if path.suffix.lower() not in SLIDE_EXT or not path.is_file():
        return False
    try:
        import openslide
    except ImportError:
        if path.suffix.lower() in (".tif", ".tiff"):
            return False
        raise TubError(f"{path} is a whole-slide image; install openslide-python (and OpenSlide) to read it") \
            from None
    return openslide.OpenSlide.detect_format(str(path)) is not None


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold (Otsu 1979) of uint8 values: maximises the between-class variance."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..255 of an (H, W, 3) uint8 image."""
    x = rgb.astype(np.float32)
    mx, mn = x.max(-1), x.min(-1)
    s = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return np.round(s * 255).astype(np.uint8)


def tissue_mask(rgb: np.ndarray, min_saturation: int = 15) -> np.ndarray:
    """Boolean tissue mask: saturation above its Otsu threshold (and above ``min_saturation``, so a
    blank slide does not split its noise into 'tissue')."""
    s = saturation(rgb)
    return s > max(otsu_threshold(s), min_saturation)


class SlideTiles:
    """Tissue tiles of one slide; ``read(start, stop)`` returns (n, tile_px, tile_px, 3) uint8."""

    def __init__(self, path: Path, tile_px: int = 224, mpp: float | None = None, level: int = 0,
                 tissue_min: float = 0.25, thumb_max: int = 2048):
        import openslide

        self.path = Path(path)
        try:
            self.slide = openslide.OpenSlide(str(path))
        except Exception as exc:  # noqa: BLE001 - OpenSlide raises several types for unreadable files
            raise TubError(f"cannot open slide {path}: {exc}") from None
        s = self.slide
        self.tile_px = tile_px
        if mpp is not None:
            mpp0 = s.properties.get(openslide.PROPERTY_NAME_MPP_X)
            if mpp0 is None:
                raise TubError(f"{path} does not record its resolution (openslide.mpp-x); "
                               "drop --slide-mpp and choose --slide-level instead")
            self.mpp0 = float(mpp0)
            factor = mpp / self.mpp0  # level-0 pixels per output pixel
            if factor < 1 - 1e-6:
                raise TubError(f"--slide-mpp {mpp} is finer than the slide's {self.mpp0} µm/px; use >= {self.mpp0}")
            self.level = s.get_best_level_for_downsample(factor + 1e-6)
            self.footprint0 = int(round(tile_px * factor))
        else:
            if not 0 <= level < s.level_count:
                raise TubError(f"--slide-level {level} does not exist; {path.name} has levels 0..{s.level_count - 1}")
            self.mpp0 = None
            self.level = level
            self.footprint0 = int(round(tile_px * s.level_downsamples[level]))
        ds = s.level_downsamples[self.level]
        self.read_px = max(1, int(round(self.footprint0 / ds)))  # tile side at the read level
        W0, H0 = s.dimensions
        nx, ny = W0 // self.footprint0, H0 // self.footprint0
        if nx == 0 or ny == 0:
            raise TubError(f"{path.name} ({W0}x{H0} px) is smaller than one tile ({self.footprint0} level-0 px)")
        thumb = self._thumbnail(thumb_max)
        mask = tissue_mask(thumb)
        sx, sy = thumb.shape[1] / W0, thumb.shape[0] / H0
        coords = []
        for j in range(ny):
            for i in range(nx):
                x0, y0 = i * self.footprint0, j * self.footprint0
                cell = mask[int(y0 * sy):max(int((y0 + self.footprint0) * sy), int(y0 * sy) + 1),
                            int(x0 * sx):max(int((x0 + self.footprint0) * sx), int(x0 * sx) + 1)]
                if cell.size and cell.mean() >= tissue_min:
                    coords.append((x0, y0))
        self.coords = np.array(coords, dtype=np.int64).reshape(-1, 2)
        self.grid = (nx, ny)

    def _thumbnail(self, thumb_max: int) -> np.ndarray:
        s = self.slide
        W0, H0 = s.dimensions
        scale = min(1.0, thumb_max / max(W0, H0))
        size = (max(1, int(W0 * scale)), max(1, int(H0 * scale)))
        return _to_rgb(s.get_thumbnail(size))

    def __len__(self) -> int:
        return len(self.coords)

    def read(self, start: int, stop: int) -> np.ndarray:
        from PIL import Image

        out = []
        for x0, y0 in self.coords[start:stop]:
            region = self.slide.read_region((int(x0), int(y0)), self.level, (self.read_px, self.read_px))
            if self.read_px != self.tile_px:
                region = region.resize((self.tile_px, self.tile_px), Image.BILINEAR)
            out.append(_to_rgb(region))
        return np.stack(out) if out else np.zeros((0, self.tile_px, self.tile_px, 3), np.uint8)

    def describe(self) -> dict:
        return {"slide": str(self.path), "level": self.level, "tile_px": self.tile_px,
                "footprint_level0_px": self.footprint0, "mpp0": self.mpp0, "grid": list(self.grid),
                "tissue_tiles": len(self)}


def _to_rgb(im) -> np.ndarray:
    """PIL RGBA/RGB -> uint8 RGB; transparent (unscanned) pixels -> white."""
    a = np.asarray(im)
    if a.ndim == 3 and a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        rgb = a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)  # read_region gives straight RGBA
        return np.round(rgb).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


def read_slide(path: Path, tile_px: int = 224, mpp: float | None = None, level: int = 0,
               tissue_min: float = 0.25):
    """A ``TileSet`` of the slide's tissue tiles (rows carry level-0 coords; patch_id = "x_y")."""
    from .tiles import TileSet

    tiler = SlideTiles(path, tile_px=tile_px, mpp=mpp, level=level, tissue_min=tissue_min)
    if len(tiler) == 0:
        raise TubError(f"{path.name}: no tissue tiles found (lower --slide-tissue-min, now {tissue_min})")
    stem = Path(path).stem
    rows = [{"tile_id": f"{stem}:{x}_{y}", "origin": f"{path}@{x},{y}", "label": "", "slide_id": stem,
             "patch_id": f"{x}_{y}", "x": int(x), "y": int(y)} for x, y in tiler.coords]
    return TileSet(name=stem, rows=rows, reader=tiler.read, extra={"slide": tiler.describe()})
