"""Reading tile collections: PNG/JPEG folders, ImageFolder trees, NPZ and HDF5 tile arrays, whole-slide
images (``slides.py``), and PathoROB metadata CSV + image root. Each input becomes a ``TileSet`` with
per-tile metadata."""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tubcli.errors import TubError

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
ARRAY_KEYS = ("tiles", "imgs", "images", "x")
LABEL_KEYS = ("labels", "label", "y", "target")
COORD_RE = re.compile(r"^(?P<slide>.+?)[_-](?:x)?(?P<x>\d+)[_-](?:y)?(?P<y>\d+)$")


@dataclass
class TileSet:
    """One input's tiles: either image paths or an array (file + dataset key), plus metadata rows."""

    name: str
    rows: list[dict]  # tile_id, origin, label, slide_id, patch_id, x, y
    paths: list[Path] | None = None
    array_file: Path | None = None
    array_key: str | None = None
    extra: dict = field(default_factory=dict)
    reader: Callable[[int, int], np.ndarray] | None = None  # e.g. a whole slide's tissue tiles

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tiles [start, stop) as (n, H, W, 3) uint8 RGB."""
        if self.reader is not None:
            return self.reader(start, stop)
        if self.paths is not None:
            return np.stack([read_image(p) for p in self.paths[start:stop]])
        if self.array_file.suffix == ".npz":
            arr = self.extra.setdefault("_cache", np.load(self.array_file)[self.array_key])
            return _hwc(arr[start:stop], self.array_file)
        import h5py

        with h5py.File(self.array_file, "r") as f:
            return _hwc(f[self.array_key][start:stop], self.array_file)


def _hwc(arr: np.ndarray, src) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise TubError(f"{src}: tile array must be (N, H, W, 3) or (N, 3, H, W), got {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0:
            arr = (arr * 255).round()
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001
        raise TubError(f"cannot read image {path}: {exc}") from exc


def _row_from_name(path: Path, label: str | None, root: Path) -> dict:
    stem = path.stem
    m = COORD_RE.match(stem)
    if m:
        slide, x, y = m["slide"], int(m["x"]), int(m["y"])
    else:
        slide, _, _ = stem.rpartition("_")
        slide, x, y = slide or root.name, -1, -1
    patch = stem[len(slide) + 1:] if stem.startswith(slide + "_") else stem
    return {"tile_id": str(path.relative_to(root)), "origin": str(path), "label": label or "",
            "slide_id": slide, "patch_id": patch, "x": x, "y": y}


def read_folder(root: Path) -> TileSet:
    """Flat image folder, or an ImageFolder tree ``root/<class>/**/*.png`` (label = class folder)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise TubError(f"{root} contains no PNG/JPEG/TIFF tiles")
    top_level = [p for p in files if p.parent == root]
    image_folder = not top_level
    rows = []
    for p in files:
        label = p.relative_to(root).parts[0] if image_folder else None
        rows.append(_row_from_name(p, label, root))
    return TileSet(name=root.name, rows=rows, paths=files, extra={"image_folder": image_folder})


def _strings(arr, n: int, default: str) -> list[str]:
    if arr is None:
        return [default] * n
    arr = np.asarray(arr)
    return [a.decode() if isinstance(a, bytes) else str(a) for a in arr.tolist()]


def read_array_file(path: Path) -> TileSet:
    """NPZ (``tiles``/``imgs``/``images``) or HDF5 (``imgs``/``tiles`` + ``coords``) tile arrays."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            keys = list(z.keys())
            key = next((k for k in ARRAY_KEYS if k in keys), None)
            if key is None:
                raise TubError(f"{path}: no tile array (one of {ARRAY_KEYS}); keys are {keys}")
            n = z[key].shape[0]
            meta = {k: z[k] for k in keys if k != key and z[k].shape[:1] == (n,)}
    else:
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise TubError(f"cannot open HDF5 file {path}: {exc}") from exc
        with f:
            key = next((k for k in ARRAY_KEYS if k in f), None)
            if key is None:
                raise TubError(f"{path}: no tile dataset (one of {ARRAY_KEYS}); datasets are {list(f)}")
            n = f[key].shape[0]
            meta = {k: f[k][()] for k in f if k != key and hasattr(f[k], "shape") and f[k].shape[:1] == (n,)}
    label = next((meta[k] for k in LABEL_KEYS if k in meta), None)
    coords = meta.get("coords")
    slides = _strings(meta.get("slide_id"), n, path.stem)
    patches = _strings(meta.get("patch_id"), n, "")
    labels = _strings(label, n, "")
    rows = []
    for i in range(n):
        x, y = (int(coords[i][0]), int(coords[i][1])) if coords is not None else (-1, -1)
        pid = patches[i] or (f"{x}_{y}" if coords is not None else str(i))
        rows.append({"tile_id": f"{path.name}:{i}", "origin": f"{path}:{i}", "label": labels[i],
                     "slide_id": slides[i], "patch_id": pid, "x": x, "y": y})
    return TileSet(name=path.stem, rows=rows, array_file=path, array_key=key)


def read_input(path: str | Path, slide_options: dict | None = None) -> TileSet:
    """One input -> TileSet; ``slide_options`` (tile_px, mpp, level, tissue_min) apply to whole slides."""
    from .slides import SLIDE_EXT, is_whole_slide, read_slide

    path = Path(path)
    if not path.exists():
        raise TubError(f"input {path} does not exist; give tile folders, .npz/.h5 files or whole slides")
    if path.is_dir():
        return read_folder(path)
    if path.suffix.lower() in (".npz", ".h5", ".hdf5"):
        return read_array_file(path)
    if is_whole_slide(path):
        return read_slide(path, **(slide_options or {}))
    if path.suffix.lower() in SLIDE_EXT - IMAGE_EXT:
        raise TubError(f"OpenSlide cannot read {path}; is it a complete whole-slide file?")
    if path.suffix.lower() in IMAGE_EXT:
        return TileSet(name=path.stem, rows=[_row_from_name(path, None, path.parent)], paths=[path])
    raise TubError(f"{path}: unsupported input; use a tile folder, an ImageFolder tree, .npz/.h5 or a "
                   "whole slide (.svs, .ndpi, .mrxs, pyramidal .tif, ...)")


# ------------------------------------------------------------------ PathoROB metadata
PATHOROB_COLUMNS = ("slide_id", "patch_id", "biological_class", "medical_center")


def read_pathorob_metadata(csv_path: Path, image_root: Path | None) -> dict[str, TileSet]:
    """PathoROB metadata CSV -> one TileSet per ``medical_center`` (rows in metadata order).

    Images are found by a ``path``/``image_path``/``filename`` column (relative to the image root)
    or at ``{root}/{slide_id}/{patch_id}.{png,jpg}``, ``{root}/{center}/{slide_id}/{patch_id}.*``,
    ``{root}/{slide_id}-{patch_id}.*`` (root or root/images).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise TubError(f"metadata CSV {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise TubError(f"{csv_path} has no rows")
    missing = [c for c in PATHOROB_COLUMNS if c not in rows[0]]
    if missing:
        raise TubError(f"{csv_path} lacks PathoROB columns {missing}; it needs {list(PATHOROB_COLUMNS)}")
    root = Path(image_root) if image_root else csv_path.parent
    path_col = next((c for c in ("path", "image_path", "filename") if c in rows[0]), None)
    groups: dict[str, TileSet] = {}
    for r in rows:
        if path_col:
            p = root / r[path_col]
        else:
            p = _find_image(root, r)
        if not p.is_file():
            raise TubError(f"no image for slide {r['slide_id']} patch {r['patch_id']} under {root}; "
                           "add a 'path' column or use {root}/{slide_id}/{patch_id}.png")
        center = r["medical_center"]
        ts = groups.setdefault(center, TileSet(name=center.replace(" ", "_"), rows=[], paths=[]))
        ts.rows.append({"tile_id": f"{r['slide_id']}-{r['patch_id']}", "origin": str(p),
                        "label": r["biological_class"], "slide_id": r["slide_id"], "patch_id": r["patch_id"],
                        "x": -1, "y": -1, "medical_center": center, "subset": r.get("subset", "")})
        ts.paths.append(p)
    return groups


def _find_image(root: Path, r: dict) -> Path:
    s, p, c = r["slide_id"], r["patch_id"], r["medical_center"]
    for base in (root, root / "images"):
        for ext in (".png", ".jpg", ".jpeg", ".tif"):
            for cand in (base / s / f"{p}{ext}", base / c / s / f"{p}{ext}", base / f"{s}-{p}{ext}",
                         base / f"{p}{ext}"):
                if cand.is_file():
                    return cand
    return root / s / f"{p}.png"
