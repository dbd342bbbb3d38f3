"""Whole-slide images as tile sets: OpenSlide pyramid -> tissue segmentation -> grid of tissue tiles.

The usual CLAM / TRIDENT patching, reimplemented for ``embed`` and ``tile``:

1. **Level and tile footprint.** With a target resolution ``mpp`` (microns per pixel) a tile covers
   ``round(tile_px * mpp / mpp0)`` level-0 pixels (mpp0 from the slide's ``openslide.mpp-x``) and is read
   from the deepest level whose downsample does not exceed that factor, then resized to ``tile_px``
   (bilinear). A target magnification ``mag`` (TRIDENT's ``--mag``) uses the factor mag0 / mag instead,
   with mag0 the slide's nominal magnification as TRIDENT estimates it (:func:`nominal_magnification`),
   so a 0.2527 µm/px scan at 20x gets 2 x 224 = 448-px footprints, not round(224 * 0.5 / 0.2527) = 443.
   Without either, tiles are ``tile_px`` pixels of ``level``.
2. **Tissue** is segmented on a thumbnail (long side ≤ ``thumb_max`` px, read from a low pyramid
   level) by :func:`tub_atlas.tissue.segment_tissue`: median-blurred saturation, Otsu or a fixed
   threshold, closing, debris and hole filters in µm², optional pen-mark exclusion.
3. **Grid** (TRIDENT's ``WSIPatcher``): top-left corners at multiples of the level-0 step
   ``footprint0 − round(overlap_px * footprint0 / tile_px)`` from (0, 0) while the corner is inside the
   slide; tiles that run over the right/bottom edge are padded white, as CLAM/TRIDENT pad them. A tile
   is kept when its tissue fraction (tissue mask pixels / tile area on the mask, outside the slide
   counting as no tissue) is ≥ ``tissue_min``.
4. **Coordinates** are level-0 pixels of each tile's top-left corner; :meth:`SlideTiles.coords_attrs`
   gives the h5 attributes CLAM and TRIDENT write beside ``coords`` (patch_size, patch_level,
   patch_size_level0, level0/target magnification, overlap, …).

Pixels outside the scanned area (alpha 0 in ``read_region``) become white.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.images import check_square_pixels, check_thumbnail_level, looks_greyscale, say_left_out
from tubcli.io import refuse_broken_link

from .tissue import TissueParams, otsu_threshold, saturation, segment_tissue, tissue_mask  # noqa: F401 (API)

SLIDE_EXT = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff"}
OPENSLIDE_HINT = "reading whole slides needs OpenSlide: pip install 'tub-atlas[slides]'"
MPP_TOLERANCE = 0.05  # a scan up to 5% coarser than asked is read as is: 20x scanners record 0.49-0.51 µm/px


def openslide_available() -> bool:
    return importlib.util.find_spec("openslide") is not None


def is_whole_slide(path: Path) -> bool:
    """True for files OpenSlide opens as slides (a plain single-image TIFF tile is not one)."""
    if path.suffix.lower() not in SLIDE_EXT or not path.is_file():
        return False
    try:
        import openslide
    except ImportError:
        if path.suffix.lower() in (".tif", ".tiff"):
            return False
        raise TubError(f"{path} is a whole-slide image; {OPENSLIDE_HINT}") from None
    return openslide.OpenSlide.detect_format(str(path)) is not None


def is_pyramid(path: Path) -> bool:
    """A whole slide for certain, not a tile that is a tiled TIFF (OpenSlide opens any tiled TIFF, a 64 px
    tile too): a slide-only format (.svs, .ndpi, ...) or a file OpenSlide opens with more than one level."""
    if path.suffix.lower() in SLIDE_EXT - {".tif", ".tiff"}:
        return True
    if not is_whole_slide(path):
        return False
    import openslide

    try:
        with openslide.OpenSlide(str(path)) as s:
            return s.level_count > 1
    except Exception:  # noqa: BLE001 - unreadable: not known to be a slide; read as a tile, it fails there
        return False


def nominal_magnification(mpp0: float | None, objective_power: str | None) -> float | None:
    """The slide's nominal objective magnification, as TRIDENT estimates it: binned from the level-0
    resolution (< 0.16 µm/px: 80x, < 0.2: 60x, < 0.3: 40x, < 0.6: 20x, < 1.2: 10x, < 2.4: 5x), else the
    scanner's ``openslide.objective-power``; None when neither is known."""
    if mpp0 is not None:
        for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
            if mpp0 < limit:
                return float(mag)
        return None
    try:
        power = float(objective_power) if objective_power else None
    except ValueError:
        return None
    return power if power and power > 0 else None


def overlap_pixels(overlap: float, tile_px: int) -> int:
    """``--slide-overlap`` in pixels at the tile resolution: a value in (0, 1) is a fraction of the tile,
    a value ≥ 1 a whole number of pixels."""
    if overlap < 0:
        raise TubError(f"--slide-overlap {overlap:g} is negative; give pixels (e.g. 32) or a fraction (e.g. 0.25)")
    if 0 < overlap < 1:
        px = int(round(overlap * tile_px))
    else:
        if overlap != int(overlap):
            raise TubError(f"--slide-overlap {overlap:g}: pixels must be whole (or give a fraction below 1)")
        px = int(overlap)
    if px >= tile_px:
        raise TubError(f"--slide-overlap {overlap:g} ({px} px) must be smaller than the tile ({tile_px} px)")
    return px


# attributes a features file (xmil features, an embed h5) records about its features, not its tiles
FEATURE_PROVENANCE = ("encoder", "precision", "weights")


def check_slide_options(options: dict) -> None:
    """Reject impossible tiling settings before any slide is opened (one-line TubError)."""
    overlap_pixels(options.get("overlap", 0), options["tile_px"])
    if options.get("mpp") is not None and options.get("mag") is not None:
        raise TubError("give either --slide-mpp or --slide-mag, not both")
    coords = options.get("coords")
    if coords is not None and not Path(coords).exists():
        raise TubError(f"--slide-coords {coords}: no patch file or folder there; give a 'tub atlas tile' run "
                       "folder or a patch .h5 file")
    tissue = options.get("tissue")
    if tissue is not None:
        try:
            tissue.check()
        except ValueError as exc:
            raise TubError(f"tissue segmentation: {exc}") from None


def grid_positions(size0: int, footprint0: int, step0: int) -> np.ndarray:
    """Level-0 starts 0, step, 2·step, … below ``size0`` (TRIDENT's column/row count)."""
    return np.arange(0, size0, step0, dtype=np.int64) if size0 > 0 else np.zeros(0, np.int64)


def tissue_fractions(mask: np.ndarray, coords: np.ndarray, footprint0: int, scale: tuple[float, float]) -> np.ndarray:
    """Fraction of each tile's area that is tissue on ``mask`` (``scale`` = mask px per level-0 px in
    x, y); tile borders are rounded to mask pixels, and mask pixels outside the image are no tissue."""
    if len(coords) == 0:
        return np.zeros(0)
    sx, sy = scale
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.round(coords[:, 0] * sx).astype(np.int64)
    y0 = np.round(coords[:, 1] * sy).astype(np.int64)
    x1 = np.maximum(np.round((coords[:, 0] + footprint0) * sx).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round((coords[:, 1] + footprint0) * sy).astype(np.int64), y0 + 1)
    cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return inside / ((x1 - x0) * (y1 - y0))


def say_base_mpp_override(name: str, base_mpp: float, recorded: float) -> bool:
    """``--slide-base-mpp`` is used as given (it is for slides that lack their resolution or record it
    wrong), but it applies to every slide of the run: where a slide records a level-0 mpp that differs
    from it by more than ``MPP_TOLERANCE``, one WARNING line for that slide names both values. True when said."""
    if recorded <= 0 or abs(base_mpp - recorded) <= MPP_TOLERANCE * recorded:
        return False
    import logging

    logging.getLogger("tub.atlas").warning(
        "%s: --slide-base-mpp %g replaces the %g µm/px the slide records (openslide.mpp-x), %+.0f%%: its tile "
        "footprints, levels and µm² areas follow %g; drop --slide-base-mpp for slides that record their resolution",
        name, base_mpp, recorded, 100 * (base_mpp / recorded - 1), base_mpp)
    return True


def recorded_mpp(slide) -> float | None:
    """The level-0 µm/px the slide records (openslide.mpp-x), or None if absent or not a positive number."""
    try:
        value = float(slide.properties.get("openslide.mpp-x", "nan"))
    except ValueError:
        return None
    return value if value > 0 else None


def level0_mpp(slide, name: str, base_mpp: float | None) -> float | None:
    """The level-0 µm/px: ``--slide-base-mpp`` if given (a WARNING where the slide records another), else the
    slide's own (refused if its pixels are not square), else None."""
    recorded = recorded_mpp(slide)
    if base_mpp is not None:
        if recorded:
            say_base_mpp_override(name, float(base_mpp), recorded)
        return float(base_mpp)
    if recorded:
        check_square_pixels(slide.properties, recorded, name, "--slide-base-mpp", MPP_TOLERANCE)
    return recorded


class SlideTiles:
    """Tissue tiles of one slide; ``read(start, stop)`` returns (n, tile_px, tile_px, 3) uint8."""

    def __init__(self, path: Path, tile_px: int = 224, mpp: float | None = None, level: int = 0,
                 tissue_min: float = 0.25, thumb_max: int = 2048, overlap: float = 0,
                 tissue: TissueParams | None = None, base_mpp: float | None = None, mag: float | None = None):
        """Opens the slide, checks the settings against it (one-line TubErrors) and segments its tissue."""
        import openslide

        self.path = Path(path)
        try:
            self.slide = openslide.OpenSlide(str(path))
        except Exception as exc:  # noqa: BLE001 - OpenSlide raises several types for unreadable files
            raise TubError(f"cannot open slide {path}: {exc}") from None
        s = self.slide
        self.tile_px = tile_px
        self.tissue_min = tissue_min
        self.mpp0 = level0_mpp(s, self.path.name, base_mpp)
        self.mag0 = nominal_magnification(self.mpp0, s.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.target_mag = mag
        if mpp is not None and mag is not None:
            raise TubError("give either --slide-mpp or --slide-mag, not both")
        if mag is not None:
            if self.mag0 is None and self.mpp0 is not None:
                raise TubError(f"{path.name}: {self.mpp0:g} µm/px is coarser than any nominal magnification (5x needs "
                               "< 2.4 µm/px); use --slide-mpp or --slide-level instead of --slide-mag")
            if self.mag0 is None:
                raise TubError(f"{path} records neither its resolution (openslide.mpp-x) nor its objective power; "
                               "give --slide-base-mpp, or use --slide-level instead of --slide-mag")
            factor = self.mag0 / mag
            if factor < 1 - 1e-6:
                raise TubError(f"--slide-mag {mag:g} is above the slide's {self.mag0:g}x; use <= {self.mag0:g}")
            self.level = s.get_best_level_for_downsample(factor + 1e-6)
            self.footprint0 = int(round(tile_px * factor))
        elif mpp is not None:
            if self.mpp0 is None:
                raise TubError(f"{path} does not record its resolution (openslide.mpp-x); give --slide-base-mpp, "
                               "or drop --slide-mpp and choose --slide-level instead")
            factor = mpp / self.mpp0  # level-0 pixels per output pixel
            if factor < 1 - MPP_TOLERANCE:
                hint = f", or --slide-mag {self.mag0:g} (its nominal magnification)" if self.mag0 else ""
                raise TubError(f"--slide-mpp {mpp} is finer than the slide's {self.mpp0} µm/px by more than "
                               f"{MPP_TOLERANCE:.0%}; use >= {self.mpp0}{hint}")
            if factor < 1:  # within the tolerance: level 0 as scanned, recorded at its own resolution
                factor, mpp = 1.0, self.mpp0
            self.level = s.get_best_level_for_downsample(factor + 1e-6)
            self.footprint0 = int(round(tile_px * factor))
        else:
            if not 0 <= level < s.level_count:
                raise TubError(f"--slide-level {level} does not exist; {path.name} has levels 0..{s.level_count - 1}")
            self.level = level
            self.footprint0 = int(round(tile_px * s.level_downsamples[level]))
        self.target_mpp = mpp if mpp is not None else (
            self.mpp0 * self.footprint0 / tile_px if self.mpp0 is not None else None)
        ds = s.level_downsamples[self.level]
        self.read_px = max(1, int(round(self.footprint0 / ds)))  # tile side at the read level
        self.overlap_px = overlap_pixels(overlap, tile_px)
        self.overlap0 = int(round(self.overlap_px * self.footprint0 / tile_px))
        self.step0 = self.footprint0 - self.overlap0
        W0, H0 = s.dimensions
        if W0 < self.footprint0 or H0 < self.footprint0:
            raise TubError(f"{path.name} ({W0}x{H0} px) is smaller than one tile ({self.footprint0} level-0 px)")

        # tissue on a thumbnail
        self.params = tissue or TissueParams()
        if self.mpp0 is None and (self.params.min_area > 0 or self.params.min_hole_area > 0):
            raise TubError(f"{path.name} does not record its resolution (openslide.mpp-x), so the µm² area "
                           "filters cannot apply; give --slide-base-mpp or --slide-min-area 0 --slide-min-hole-area 0")
        self.thumb = self._thumbnail(thumb_max)
        th, tw = self.thumb.shape[:2]
        self.scale = (tw / W0, th / H0)  # mask px per level-0 px
        mask_mpp = self.mpp0 / math.sqrt(self.scale[0] * self.scale[1]) if self.mpp0 else None
        try:
            self.tissue = segment_tissue(self.thumb, mask_mpp, self.params)
        except ValueError as exc:
            raise TubError(f"{path.name}: {exc}") from None
        if not self.tissue.mask.any() and looks_greyscale(self.thumb):
            raise TubError(f"{path.name}: the slide has no colour (greyscale), so tissue detection, which thresholds "
                           "saturation, cannot see tissue; tile it with another tool and pass its patches with "
                           "--slide-coords")

        xs = grid_positions(W0, self.footprint0, self.step0)
        ys = grid_positions(H0, self.footprint0, self.step0)
        self.grid = (len(xs), len(ys))
        yy, xx = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
        cand = np.stack([xx.ravel(), yy.ravel()], 1)
        self.fractions_all = tissue_fractions(self.tissue.mask, cand, self.footprint0, self.scale)
        keep = self.fractions_all >= tissue_min if tissue_min > 0 else self.fractions_all > 0
        self.coords = cand[keep].reshape(-1, 2).astype(np.int64)
        self.fractions = self.fractions_all[keep]
        self.tissue_summary = self.tissue.summary()
        self._qc_png: bytes | None = None
        self._geojson: dict | None = None

    @classmethod
    def from_coords(cls, path: Path, h5_path: Path, base_mpp: float | None = None) -> "SlideTiles":
        """Tiles at the coordinates of an existing patch file instead of segmenting: ``tub atlas tile``
        and TRIDENT (``patch_size`` at the target resolution + ``patch_size_level0``) or CLAM
        (``patch_size`` + ``patch_level``: the tile is ``patch_size`` pixels of that level). ``base_mpp``
        (--slide-base-mpp) is the level-0 µm/px recorded for them (the tiles' resolution follows), as
        when tiling anew."""
        import h5py
        import openslide

        self = cls.__new__(cls)
        self.path = Path(path)
        try:
            self.slide = s = openslide.OpenSlide(str(path))
        except Exception as exc:  # noqa: BLE001
            raise TubError(f"cannot open slide {path}: {exc}") from None
        try:
            with h5py.File(h5_path, "r") as f:
                coords = np.asarray(f["coords"][()], np.int64).reshape(-1, 2)
                attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v)
                         for k, v in f["coords"].attrs.items()}
        except (OSError, KeyError) as exc:
            raise TubError(f"{h5_path}: not a patch file with a 'coords' dataset ({exc})") from None
        if "patch_size" not in attrs:
            raise TubError(f"{h5_path}: 'coords' has no patch_size attribute; write it with 'tub atlas tile'")
        W0, H0 = s.dimensions
        if len(coords) and ((coords < 0).any() or (coords[:, 0] >= W0).any() or (coords[:, 1] >= H0).any()):
            raise TubError(f"{h5_path}: coordinates lie outside {self.path.name} ({W0}x{H0} level-0 px); "
                           "is it the patch file of another slide?")
        self.tile_px = int(attrs["patch_size"])
        level = attrs.get("patch_level")
        if "patch_size_level0" in attrs:
            self.footprint0 = int(attrs["patch_size_level0"])
        elif level is not None and 0 <= int(level) < s.level_count:
            self.footprint0 = int(round(self.tile_px * s.level_downsamples[int(level)]))
        else:
            raise TubError(f"{h5_path}: 'coords' needs patch_size_level0 (TRIDENT) or a valid patch_level (CLAM)")
        factor = self.footprint0 / self.tile_px
        self.level = int(level) if level is not None and 0 <= int(level) < s.level_count \
            and s.level_downsamples[int(level)] <= factor + 1e-6 else s.get_best_level_for_downsample(factor + 1e-6)
        self.read_px = max(1, int(round(self.footprint0 / s.level_downsamples[self.level])))
        self.mpp0 = level0_mpp(s, self.path.name, base_mpp) or attrs.get("level0_mpp")
        self.target_mpp = self.mpp0 * factor if self.mpp0 else None
        self.mag0 = nominal_magnification(self.mpp0, s.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.target_mag = self.mag0 / factor if self.mag0 else None
        self.overlap_px = int(attrs.get("overlap", 0) or 0)
        self.overlap0 = int(round(self.overlap_px * factor))
        self.step0 = self.footprint0 - self.overlap0
        self.tissue_min = attrs.get("min_tissue_proportion")
        self.grid = None
        self.coords, self.fractions = coords, None
        self.thumb = self.tissue = self.fractions_all = None
        self.tissue_summary = {"coords_from": str(h5_path)}
        self._qc_png = self._geojson = None
        self._attrs_in = attrs
        return self

    @property
    def has_qc(self) -> bool:
        """Whether a QC image and outlines exist (rendered, or renderable from the kept masks)."""
        return self._qc_png is not None or self.tissue is not None

    def compact(self, qc: bool = True) -> None:
        """Render the QC image and outlines now (if ``qc``) and drop the thumbnail and masks, so that
        a tiled slide keeps only coordinates and small outputs in memory."""
        if qc and self.tissue is not None:
            import io

            buf = io.BytesIO()
            self.qc_image().save(buf, format="PNG")
            self._qc_png, self._geojson = buf.getvalue(), self.contours_geojson()
        self.thumb = self.tissue = self.fractions_all = None

    def _thumbnail(self, thumb_max: int) -> np.ndarray:
        s = self.slide
        W0, H0 = s.dimensions
        scale = min(1.0, thumb_max / max(W0, H0))
        size = (max(1, int(W0 * scale)), max(1, int(H0 * scale)))
        check_thumbnail_level(self.path.name, *s.level_dimensions[s.get_best_level_for_downsample(1 / scale)])
        return _to_rgb(s.get_thumbnail(size))

    def __len__(self) -> int:
        return len(self.coords)

    def read(self, start: int, stop: int) -> np.ndarray:
        from PIL import Image

        out = []
        for x0, y0 in self.coords[start:stop]:
            try:
                region = self.slide.read_region((int(x0), int(y0)), self.level, (self.read_px, self.read_px))
            except Exception as exc:  # noqa: BLE001 - OpenSlideError on damaged tile data: say where
                raise TubError(f"{self.path.name}: cannot read the tile at level-0 ({int(x0)}, {int(y0)}), level "
                               f"{self.level}: {str(exc).splitlines()[0][:120]}") from None
            if self.read_px != self.tile_px:
                region = region.resize((self.tile_px, self.tile_px), Image.BILINEAR)
            out.append(_to_rgb(region))
        return np.stack(out) if out else np.zeros((0, self.tile_px, self.tile_px, 3), np.uint8)

    def coords_attrs(self) -> dict:
        """Attributes of the h5 ``coords`` dataset, named as CLAM (patch_size, patch_level, downsample,
        level_dim and downsampled_level_dim: both the size of patch_level, as CLAM's create_patches_fp writes
        them) and TRIDENT (patch_size_level0, level0/target_magnification with mag = 10 / mpp, overlap,
        level0_width/height) write them; tub adds level0_mpp, target_mpp and read_size (the side read at
        patch_level before resizing to patch_size; CLAM's readers assume the two are equal)."""
        s = self.slide
        W0, H0 = s.dimensions
        ds = float(s.level_downsamples[self.level])
        level = {"downsample": [ds, ds], "downsampled_level_dim": list(s.level_dimensions[self.level]),
                 "level_dim": list(s.level_dimensions[self.level])}  # of patch_level
        if getattr(self, "_attrs_in", None) is not None:  # coordinates from a patch file: keep its attributes
            kept = {k: v for k, v in self._attrs_in.items() if k not in FEATURE_PROVENANCE}  # not these features'
            # those that describe patch_level follow the level written here (an older tub wrote level 0's size)
            # the resolution is this slide's (recorded, or --slide-base-mpp), not what the file's run assumed
            res = {"level0_mpp": self.mpp0, "target_mpp": self.target_mpp} if self.mpp0 is not None else {}
            return {**kept, **{k: v for k, v in level.items() if k in kept}, **res, "patch_level": self.level,
                    "patch_size_level0": self.footprint0}
        a = {"patch_size": self.tile_px, "patch_level": self.level, "patch_size_level0": self.footprint0,
             "read_size": self.read_px, **level, "level0_width": W0, "level0_height": H0, "overlap": self.overlap_px,
             "step_level0": self.step0, "min_tissue_proportion": self.tissue_min, "name": self.path.stem}
        if self.mpp0 is not None:
            a["level0_mpp"] = self.mpp0
            a["level0_magnification"] = round(10.0 / self.mpp0, 6)
        if self.target_mpp is not None:
            a["target_mpp"] = self.target_mpp
            a["target_magnification"] = round(10.0 / self.target_mpp, 6)
        if self.target_mag is not None:  # --slide-mag: the nominal magnifications, as TRIDENT writes them
            a["level0_magnification"], a["target_magnification"] = self.mag0, self.target_mag
        return a

    def describe(self) -> dict:
        """The tiling in a few numbers; ``target_mag`` is the magnification the h5 records (10 / target_mpp
        when the tiles were chosen by µm/px)."""
        mag = self.target_mag if self.target_mag is not None else (
            round(10.0 / self.target_mpp, 6) if self.target_mpp else None)
        return {"slide": str(self.path), "level": self.level, "tile_px": self.tile_px,
                "footprint_level0_px": self.footprint0, "step_level0_px": self.step0, "overlap_px": self.overlap_px,
                "mpp0": self.mpp0, "target_mpp": self.target_mpp, "mag0": self.mag0,
                "target_mag": mag, "grid": list(self.grid) if self.grid else None,
                "tissue_tiles": len(self), **self.tissue_summary}

    def qc_image(self, max_side: int = 1024):
        """PIL image for quality control: the thumbnail with tissue tinted green and outlined, kept holes
        outlined in yellow, excluded ink tinted red, and every kept tile's square in blue."""
        from PIL import Image, ImageDraw
        from scipy import ndimage

        t = self.tissue
        img = self.thumb.astype(np.float32)
        tint = np.zeros_like(img)
        tint[t.mask] = (0, 200, 0)
        tint[t.pen] = (255, 0, 0)
        a = np.where(t.mask | t.pen, 0.3, 0.0)[..., None]
        img = img * (1 - a) + tint * a
        edge = t.mask & ~ndimage.binary_erosion(t.mask, border_value=1)
        hole_edge = t.holes & ~ndimage.binary_erosion(t.holes, border_value=1)
        img[edge] = (0, 140, 0)
        img[hole_edge] = (230, 200, 0)
        im = Image.fromarray(np.round(img).astype(np.uint8))
        f = min(1.0, max_side / max(im.size))
        if f < 1.0:
            im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.BILINEAR)
        sx, sy = self.scale[0] * f, self.scale[1] * f
        draw = ImageDraw.Draw(im)
        for x, y in self.coords:
            draw.rectangle([x * sx, y * sy, (x + self.footprint0) * sx - 1, (y + self.footprint0) * sy - 1],
                           outline=(30, 60, 220))
        return im

    def contours_geojson(self) -> dict:
        """Tissue outlines (with kept holes) in level-0 pixels, one GeoJSON Polygon per component."""
        from .tissue import mask_outlines, outlines_geojson

        polys = mask_outlines(self.tissue.mask, self.tissue.labels)
        px_um2 = self.tissue.mpp ** 2 if self.tissue.mpp else None
        for p in polys:
            p["area_um2"] = round(p["area"] * px_um2, 1) if px_um2 else None
        gj = outlines_geojson(polys, (1 / self.scale[0], 1 / self.scale[1]), {"slide": self.path.stem})
        for feat, p in zip([f for f in gj["features"]], [p for p in polys if p["exterior"] is not None]):
            feat["properties"]["area_um2"] = p["area_um2"]
            if p["area_um2"] is not None:
                feat["properties"]["measurements"]["area_um2"] = p["area_um2"]
        return gj


def recorded_slide_name(h5_path: Path) -> str | None:
    """The slide name a patch file records (``coords`` attribute ``name``, written by tub, CLAM and
    TRIDENT), or None."""
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            name = f["coords"].attrs.get("name") if "coords" in f else None
    except OSError as exc:
        raise TubError(f"--slide-coords {h5_path}: cannot read it as HDF5 ({exc})") from None
    return None if name is None else (name.decode() if isinstance(name, bytes) else str(name))


def check_coords_file(coords: Path, inputs: list[Path]) -> None:
    """Before any slide is opened: one patch FILE holds one slide's coordinates, so it may serve one
    whole-slide input only, and only the slide it records (a folder is searched per slide by name)."""
    if not coords.is_file():
        return
    slides = [p for p in inputs if p.is_file() and p.suffix.lower() in SLIDE_EXT]
    if len(slides) > 1:
        raise TubError(f"--slide-coords {coords} is one slide's patch file but {len(slides)} slides are given "
                       f"({', '.join(p.name for p in slides[:3])}{', …' if len(slides) > 3 else ''}); give a "
                       "folder of <slide>.h5 patch files or embed one slide per run")
    for p in slides:
        _check_coords_name(coords, p)


def _check_coords_name(h5_path: Path, slide: Path) -> None:
    name = recorded_slide_name(h5_path)
    if name is not None and name != slide.stem:
        raise TubError(f"--slide-coords {h5_path} holds the coordinates of slide {name!r}, not of {slide.name}; "
                       "give that slide's patch file (or a folder of them)")


def find_coords_file(slide: Path, where: Path) -> Path:
    """The patch file of ``slide`` in ``where``: the file itself (if it records no other slide's name),
    or ``<stem>.h5`` / ``<stem>_patches.h5`` (TRIDENT) directly there or in ``patches/`` (a
    ``tub atlas tile`` run folder or its outputs)."""
    if where.is_file():
        _check_coords_name(where, slide)
        return where
    stem = slide.stem
    for d in (where, where / "patches", where / "outputs" / "patches"):
        for name in (f"{stem}.h5", f"{stem}_patches.h5"):
            if (d / name).is_file():
                return d / name
    raise TubError(f"no patch file for {slide.name} in {where} (looked for {stem}.h5 and {stem}_patches.h5, "
                   "also under patches/); run 'tub atlas tile' first or drop --slide-coords")


def _to_rgb(im) -> np.ndarray:
    """PIL RGBA/RGB -> uint8 RGB; transparent (unscanned) pixels -> white."""
    a = np.asarray(im)
    if a.ndim == 3 and a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        rgb = a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)  # read_region gives straight RGBA
        return np.round(rgb).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


def read_slide(path: Path, tile_px: int = 224, mpp: float | None = None, level: int = 0,
               tissue_min: float = 0.25, overlap: float = 0, tissue: TissueParams | None = None,
               base_mpp: float | None = None, thumb_max: int = 2048, qc: bool = True,
               coords: Path | None = None, mag: float | None = None):
    """A ``TileSet`` of the slide's tissue tiles (rows carry level-0 coords; patch_id = "x_y"); the
    compacted tiler is in ``extra["tiler"]`` (QC image and contours if ``qc``, h5 attributes). With
    ``coords`` (a patch file or a folder of them) the tiles come from there, without segmentation."""
    from .tiles import TileSet

    if coords is not None:
        found = find_coords_file(Path(path), Path(coords))
        tiler = SlideTiles.from_coords(path, found, base_mpp=base_mpp)
        if len(tiler) == 0:  # no segmentation here: the tissue settings cannot help
            raise TubError(f"{path.name}: its coords file {found} holds no tiles; tile the slide again (the "
                           "tiler found no tissue) or leave it out")
    else:
        tiler = SlideTiles(path, tile_px=tile_px, mpp=mpp, level=level, tissue_min=tissue_min, overlap=overlap,
                           tissue=tissue, base_mpp=base_mpp, thumb_max=thumb_max, mag=mag)
    tiler.compact(qc=qc)
    if len(tiler) == 0:
        raise TubError(f"{path.name}: no tissue tiles found (lower --slide-tissue-min, now {tissue_min}, "
                       "or check the tissue mask with 'tub atlas tile')")
    stem = Path(path).stem
    rows = [{"tile_id": f"{stem}:{x}_{y}", "origin": f"{path}@{x},{y}", "label": "", "slide_id": stem,
             "patch_id": f"{x}_{y}", "x": int(x), "y": int(y)} for x, y in tiler.coords]
    return TileSet(name=stem, rows=rows, reader=tiler.read,
                   extra={"slide": tiler.describe(), "coords_attrs": tiler.coords_attrs(), "tiler": tiler})


def write_slide_qc(tiler: SlideTiles, folder: Path, name: str) -> dict:
    """``{folder}/{name}.png`` (tissue, holes, ink, tiles over the thumbnail) and ``{name}.geojson``
    (tissue outlines in level-0 pixels); returns their paths."""
    import json

    from tubcli.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    png, gj = folder / f"{name}.png", folder / f"{name}.geojson"
    with atomic_path(png) as tmp:
        if tiler._qc_png is not None:
            Path(tmp).write_bytes(tiler._qc_png)
        else:
            tiler.qc_image().save(tmp, format="PNG")
    with atomic_path(gj) as tmp:
        Path(tmp).write_text(json.dumps(tiler._geojson if tiler._geojson is not None else tiler.contours_geojson()))
    return {"qc_png": str(png), "contours": str(gj)}


def write_coords_h5(path: Path, coords: np.ndarray, attrs: dict) -> None:
    """CLAM/TRIDENT patch file: one ``coords`` (N, 2) int64 dataset of level-0 top-left corners with the
    tiling in its attributes."""
    import h5py

    from tubcli.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
            for k, v in attrs.items():
                d.attrs[k] = v


def tiler_from_options(path: Path, options: dict) -> SlideTiles:
    """``SlideTiles`` from a ``SlideTiling.slide_options()`` dict."""
    o = options
    return SlideTiles(path, tile_px=o["tile_px"], mpp=o["mpp"], level=o["level"], tissue_min=o["tissue_min"],
                      overlap=o["overlap"], tissue=o["tissue"], base_mpp=o["base_mpp"], thumb_max=o["thumb_max"],
                      mag=o.get("mag"))


def slides_in_folder(folder: Path) -> list[Path] | None:
    """The whole slides directly in ``folder`` (sorted, as CLAM/TRIDENT read a slide folder), or None
    for a folder of tiles. A tile folder may hold plain (strip) TIFF tiles, so a folder of .tif files is
    one of slides when OpenSlide opens one of its first few as a slide; then every file with a slide
    suffix is a slide, and an unreadable one fails alone, in its batch item (as a slide given by name).
    A folder of slides and tile images together is an error."""
    for p in folder.iterdir():
        if p.suffix.lower() in SLIDE_EXT:
            refuse_broken_link(p)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in files if p.suffix.lower() in SLIDE_EXT]
    tiffs = [p for p in candidates if p.suffix.lower() in (".tif", ".tiff")]
    definite = [p for p in candidates if p not in tiffs]  # .svs, .ndpi, .mrxs …: never tiles
    if not definite and not any(is_whole_slide(p) for p in tiffs[:8]):
        return None
    slides = definite + tiffs
    from .tiles import IMAGE_EXT

    tiles = [p for p in files if p.suffix.lower() in IMAGE_EXT and p not in slides]
    if tiles:
        raise TubError(f"{folder} holds whole slides ({slides[0].name}) and tile images ({tiles[0].name}); "
                       "put them in separate folders")
    say_left_out(folder, [p.name for p in files if p not in slides])
    return sorted(slides)


def check_slide_file(path: Path) -> None:
    """Before any slide is opened: the path is a file with a whole-slide suffix. Whether OpenSlide can
    read it is found out by the shard that tiles it, so a bad slide fails alone."""
    if not path.exists():
        raise TubError(f"slide {path} does not exist")
    if not path.is_file() or path.suffix.lower() not in SLIDE_EXT:
        raise TubError(f"{path} is not a whole-slide image (.svs, .ndpi, .mrxs, pyramidal .tif, …)")


def check_slide_path(path: Path) -> None:
    """When the slide's turn comes: also that OpenSlide opens it."""
    check_slide_file(path)
    if not openslide_available():  # else a pyramidal .tif would be called "not a whole-slide image"
        raise TubError(f"{path}: {OPENSLIDE_HINT}")
    if not is_whole_slide(path):
        raise TubError(f"{path} is not a whole-slide image OpenSlide can open "
                       "(.svs, .ndpi, .mrxs, pyramidal .tif, …)")


def tile_slide(path: Path, out_h5: Path, outputs: Path, options: dict, log=None, record=None) -> dict:
    """``tub atlas tile`` for one slide: ``patches/<slide>.h5`` (coords), ``visualization/<slide>.png``
    (QC) and ``contours_geojson/<slide>.geojson``, the folders TRIDENT writes. ``record`` gets the
    summary before the patch file is written (``Run.record_item``)."""
    path = Path(path)
    check_slide_path(path)
    tiler = tiler_from_options(path, options)
    name = path.stem
    qc = write_slide_qc(tiler, outputs / "visualization", name)
    (outputs / "contours_geojson").mkdir(parents=True, exist_ok=True)
    Path(qc["contours"]).replace(outputs / "contours_geojson" / f"{name}.geojson")
    qc["contours"] = str(outputs / "contours_geojson" / f"{name}.geojson")
    if len(tiler) == 0 and log is not None:
        log.warning("%s: no tile reaches --slide-tissue-min %s; see %s", name, tiler.tissue_min, qc["qc_png"])
    summary = {**tiler.describe(), "coords_h5": str(out_h5), **qc}
    if record is not None:
        record(summary)
    write_coords_h5(out_h5, tiler.coords, tiler.coords_attrs())
    return summary
