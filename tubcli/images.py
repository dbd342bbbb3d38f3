"""Tile images as uint8 RGB by one rule for every plugin that reads pathology tiles (atlas, pathorob).

PIL's RGB conversion saturates 16-bit, 32-bit and float greyscale to white, so those go through
:func:`to_uint8` instead. Transparent pixels are composited on white, as a slide's area outside its
scan is read (OpenSlide's transparent RGBA), so a tile cut from a slide and saved as RGBA PNG embeds
like the slide region. EXIF orientation is not applied (torchvision's loaders do not either), except in
TIFF, whose loader in PIL applies its orientation tag itself; ICC colour profiles are not applied either
(the stored values are read as sRGB, as torchvision and the foundation models' training data do).
The checks both whole-slide tilers (xmil and atlas) make of a slide live here too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.io import refuse_broken_link

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
FLOAT_TOLERANCE = 1e-3  # float tiles may overshoot [0, 1] by rounding (e.g. after resampling)
MAX_THUMBNAIL_SOURCE_PX = 64_000_000  # the largest slide level read whole for a thumbnail (8000x8000 RGBA: 256 MB)


def check_thumbnail_level(name: str, width: int, height: int) -> None:
    """OpenSlide reads the whole level a thumbnail is made from: on a single-level giant slide that takes
    GBs, so a level above :data:`MAX_THUMBNAIL_SOURCE_PX` is a one-line error (xmil and atlas tiling)."""
    if width * height > MAX_THUMBNAIL_SOURCE_PX:
        raise TubError(f"{name}: no pyramid level small enough for a thumbnail (the nearest is {width}x{height} px); "
                       "the slide is not pyramidal: convert it to a tiled pyramidal TIFF (e.g. vips tiffsave "
                       "in.tif out.tif --tile --pyramid)")


def check_square_pixels(properties, mpp_x: float, name: str, flag: str, tolerance: float = 0.05) -> None:
    """Refuse a slide whose pixels are not square (openslide.mpp-y differs from mpp-x by more than
    ``tolerance``): its square tiles would cover a rectangle of tissue, which no encoder trained on square
    pixels expects, and its µm² areas would be wrong. ``flag`` is the option that overrides the mpp."""
    try:
        mpp_y = float(properties.get("openslide.mpp-y", mpp_x))
    except ValueError:
        return
    if mpp_y > 0 and abs(mpp_y - mpp_x) > tolerance * mpp_x:
        raise TubError(f"{name}: its pixels are not square ({mpp_x:g} x {mpp_y:g} µm, openslide.mpp-x x mpp-y), so "
                       f"a tile would cover {mpp_y / mpp_x:.2f}x more tissue down than across; resample the slide to "
                       f"square pixels, or give {flag} to treat them as square")


def looks_greyscale(rgb: np.ndarray, min_std: float = 8.0) -> bool:
    """True for a greyscale image with something on it (R = G = B up to compression noise in 99% of pixels,
    grey levels that vary by ``min_std``): saturation is zero everywhere, so no saturation threshold can find
    its tissue. Blank glass (uniform grey) is not counted: it has no tissue to find."""
    rgb = rgb[..., :3]
    no_colour = float(np.percentile(rgb.max(-1).astype(np.int16) - rgb.min(-1), 99)) <= 2
    return no_colour and float(rgb.mean(-1).std()) >= min_std


def say_left_out(folder, names: list[str]) -> None:
    """An INFO line naming the files of an input folder that are not read (a labels CSV, a PNG beside the
    slides), so that a file that goes missing from the outputs is explained."""
    if names:
        import logging

        logging.getLogger("tub").info("%s: %d file(s) of other kinds left out (%s%s)", folder, len(names),
                                      ", ".join(names[:3]), ", ..." if len(names) > 3 else "")


def to_uint8(arr: np.ndarray, src) -> np.ndarray:
    """Pixels as uint8: uint8 as is; uint16 scaled by 255/65535 (its full range, e.g. 16-bit PNGs);
    other integers must already lie in 0..255; floats must be finite and in [0, 1]. Anything else is a
    one-line error naming ``src``."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        return np.round(arr / 257.0).astype(np.uint8)
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise TubError(f"{src}: {arr.dtype} pixel values span {lo}..{hi}, outside 0..255; "
                           "store tiles as uint8 (0..255), uint16 (0..65535) or float (0..1)")
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise TubError(f"{src}: tiles contain NaN or infinite values; fix or drop those tiles")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
            raise TubError(f"{src}: float tiles must be RGB in [0, 1], found {lo:g}..{hi:g}; "
                           "divide 0..255 data by 255 or store uint8")
        return np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    raise TubError(f"{src}: tile pixels of dtype {arr.dtype} are not supported; "
                   "store uint8, uint16 or float (0..1)")


EXIF_ORIENTATION = 0x0112


def read_rgb(path: Path, rotated: list | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB. 8-bit modes go through PIL's RGB conversion (which reads 16-bit RGB PNG/TIFF
    by their high byte, within one grey level of v/257); greyscale modes I;16*, I and F through
    :func:`to_uint8`. ``rotated``, a list, gets ``(path, orientation)`` when the file carries an EXIF
    orientation other than 1 (JPEG, PNG, WebP; read from the loaded image, so at no extra decode), for
    the caller to warn that the stored pixels are used."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x its pixel limit: a tile is never that big
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode = im.mode
                high = mode.startswith("I") or mode == "F"
                arr = np.asarray(im) if high else np.asarray(_on_white(im))
                orientation = im.getexif().get(EXIF_ORIENTATION, 1) if rotated is not None else 1
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise TubError(f"{path} has more pixels than PIL reads safely ({Image.MAX_IMAGE_PIXELS} at most); tiles are "
                       "expected here (whole slides go through the slide readers)") from None
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for a damaged file)
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if Path(path).suffix.lower() in (".tif", ".tiff") and "cannot identify" in why:
            why += " (PIL reads no float or multi-sample RGB TIFF: save tiles as 8- or 16-bit RGB, or as an array)"
        raise TubError(f"cannot read image {path}: {why}") from None
    if high:
        if arr.ndim != 2:
            raise TubError(f"{path}: {arr.ndim}-D pixel array of mode {mode}; store tiles as 8-bit or 16-bit "
                           "greyscale/RGB images")
        arr = np.repeat(to_uint8(arr, path)[..., None], 3, axis=-1)
    if orientation not in (None, 1):
        rotated.append((Path(path), int(orientation)))
    return arr


def say_rotated(rotated: list, log) -> bool:
    """A WARNING naming the first tile of ``rotated`` (see :func:`read_rgb`); True when said (callers say it
    once per run)."""
    if not rotated:
        return False
    log.warning("%s has EXIF orientation %d (not 1): tiles are read as their pixels are stored, not rotated "
                "as a viewer shows them (as torchvision reads them); rotate the files if the viewer's "
                "orientation is meant (said for the first such file of the run only)", *rotated[0])
    return True


def _on_white(im):
    """An 8-bit PIL image as RGB, transparent pixels composited on white (``convert("RGB")`` alone
    drops the alpha and keeps whatever colour a transparent pixel stores, often black)."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def image_files(root: Path) -> list[Path]:
    """Tile images anywhere below ``root``, sorted: flat folders and ImageFolder trees. Symlinked
    folders are followed (a tree of linked class folders, as torchvision's ImageFolder reads it), each
    real folder once; hidden files and folders (``.ipynb_checkpoints/``, ``._x.png``) are left out, and
    files of other kinds are named in an INFO line. A folder that cannot be read, or a link to one that
    is gone, is an error: skipped, a whole class would be missing from a run that reports success."""
    out, seen, other = [], set(), []

    def unreadable(err: OSError) -> None:
        raise TubError(f"{err.filename}: cannot read this folder ({err.strerror}), so its tiles would be left out; "
                       f"make it readable or move it out of {root}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            path = Path(dirpath) / f
            suffix = path.suffix.lower()
            if f.startswith("."):
                continue
            refuse_broken_link(path)  # a tile, or a class folder ('grade_2.5') on a volume this node lacks
            if suffix in IMAGE_EXTENSIONS and path.is_file():
                out.append(path)
            elif path.is_file():
                other.append(str(path.relative_to(root)))
    say_left_out(root, sorted(other))
    return sorted(out)
