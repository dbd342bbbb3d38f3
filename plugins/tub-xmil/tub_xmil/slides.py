"""Opening whole-slide images with OpenSlide, with mpp handling and one-line errors."""

from __future__ import annotations

from pathlib import Path

from tubcli.errors import TubError

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".czi",
                  ".dcm", ".svslide"}


def open_slide(path: str | Path):
    """An ``openslide.OpenSlide``; unreadable or non-slide files raise a TubError."""
    try:
        import openslide
    except ImportError as exc:  # a declared dependency, but a broken or partial environment happens
        raise TubError(f"reading {Path(path).name} needs OpenSlide, which does not load here ({exc}); "
                       "pip install openslide-python openslide-bin") from None

    path = Path(path)
    if not path.is_file():
        raise TubError(f"{path}: no such file")
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001
        fmt = None
    if fmt is None:
        raise TubError(f"{path.name}: not a slide OpenSlide can read (untiled image, OME-TIFF or "
                       "corrupt file); convert it to a tiled pyramidal TIFF")
    try:
        return openslide.OpenSlide(str(path))
    except Exception as exc:  # noqa: BLE001
        raise TubError(f"{path.name}: OpenSlide cannot open it ({str(exc).splitlines()[0][:100]})") from None


def slide_mpp(slide, path: str | Path, override: float | None = None) -> float:
    """Microns per pixel at level 0: ``override`` if given, else openslide.mpp-x."""
    if override is not None:
        return float(override)
    props = slide.properties
    for key in ("openslide.mpp-x", "aperio.MPP"):
        if key in props:
            try:
                v = float(props[key])
            except ValueError:
                continue
            if v > 0:
                return v
    raise TubError(f"{Path(path).name}: slide has no mpp (microns per pixel); pass --mpp, "
                   "e.g. --mpp 0.25 for 40x or 0.5 for 20x")


def read_tile(slide, x: int, y: int, size_level0: int, out_size: int):
    """RGB tile (out_size, out_size) uint8 from level-0 box (x, y, size_level0), read at the best
    level and resized."""
    import numpy as np
    from PIL import Image

    ds = size_level0 / out_size
    level = slide.get_best_level_for_downsample(max(ds, 1.0))
    lds = slide.level_downsamples[level]
    sz = int(round(size_level0 / lds))
    region = slide.read_region((int(x), int(y)), level, (sz, sz))
    bg = Image.new("RGB", region.size, (255, 255, 255))
    bg.paste(region, mask=region.split()[3])  # transparent background -> white
    if sz != out_size:
        bg = bg.resize((out_size, out_size), Image.BILINEAR)
    return np.asarray(bg)
