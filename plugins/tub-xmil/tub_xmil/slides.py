"""Opening whole-slide images with OpenSlide, with mpp handling and one-line errors."""

from __future__ import annotations

from pathlib import Path

from tubcli.errors import TubError
from tubcli.images import check_square_pixels

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
        with open(path, "rb") as fh:
            tiff = fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
        if tiff:
            raise TubError(f"{path.name}: a TIFF that OpenSlide cannot read as a slide (untiled, OME-TIFF or "
                           "damaged); convert it to a tiled pyramidal TIFF")
        raise TubError(f"{path.name}: not a slide in a format OpenSlide knows (a damaged file, or not an image "
                       "at all?); check the file")
    try:
        return openslide.OpenSlide(str(path))
    except Exception as exc:  # noqa: BLE001
        raise TubError(f"{path.name}: OpenSlide cannot open it ({str(exc).splitlines()[0][:100]})") from None


def recorded_mpp(slide) -> float | None:
    """Microns per pixel at level 0 as the slide records it (openslide.mpp-x, aperio.MPP), or None."""
    props = slide.properties
    for key in ("openslide.mpp-x", "aperio.MPP"):
        if key in props:
            try:
                v = float(props[key])
            except ValueError:
                continue
            if v > 0:
                return v
    return None


def slide_mpp(slide, path: str | Path, override: float | None = None) -> float:
    """Microns per pixel at level 0: ``override`` if given (a WARNING when it contradicts the slide's
    own value by more than 5%: it applies to every slide of the batch), else the recorded one."""
    recorded = recorded_mpp(slide)
    if override is not None:
        if recorded is not None and abs(float(override) - recorded) > 0.05 * recorded:
            import logging

            logging.getLogger("tub").warning("%s: --mpp %g replaces the %g µm/px the slide records (tiles %.2fx the "
                                             "physical size they would have)", Path(path).name, float(override),
                                             recorded, recorded / float(override))
        return float(override)
    if recorded is not None:
        check_square_pixels(slide.properties, recorded, Path(path).name, "--mpp")
        return recorded
    raise TubError(f"{Path(path).name}: slide has no mpp (microns per pixel); pass --mpp, "
                   "e.g. --mpp 0.25 for 40x or 0.5 for 20x")


def slide_bounds(slide) -> tuple[int, int]:
    """(openslide.bounds-x, -y): where the scanned area starts in level-0 pixels (MRXS and others record it;
    QuPath shows such a slide cropped to it, so its image (0, 0) is this level-0 point); (0, 0) if none."""
    props = slide.properties
    try:
        return int(props.get("openslide.bounds-x", 0) or 0), int(props.get("openslide.bounds-y", 0) or 0)
    except ValueError:
        return 0, 0


def read_level(slide, size_level0: int, out_size: int) -> tuple[int, float, int]:
    """(pyramid level, its downsample, side read there) for a level-0 box of ``size_level0`` px that
    becomes ``out_size`` px: the deepest level not coarser than the output, then resized."""
    level = slide.get_best_level_for_downsample(max(size_level0 / out_size, 1.0))
    lds = float(slide.level_downsamples[level])
    return level, lds, max(1, int(round(size_level0 / lds)))


def read_tile(slide, x: int, y: int, size_level0: int, out_size: int):
    """RGB tile (out_size, out_size) uint8 from level-0 box (x, y, size_level0), read at the best
    level and resized."""
    import numpy as np
    from PIL import Image

    level, _, sz = read_level(slide, size_level0, out_size)
    try:
        region = slide.read_region((int(x), int(y)), level, (sz, sz))
    except Exception as exc:  # noqa: BLE001 - OpenSlideError on damaged tile data: say where
        raise TubError(f"cannot read the tile at level-0 ({int(x)}, {int(y)}), level {level}: "
                       f"{str(exc).splitlines()[0][:120]}") from None
    bg = Image.new("RGB", region.size, (255, 255, 255))
    bg.paste(region, mask=region.split()[3])  # transparent background -> white
    if sz != out_size:
        bg = bg.resize((out_size, out_size), Image.BILINEAR)
    return np.asarray(bg)
