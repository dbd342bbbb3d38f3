"""Reading tile collections: PNG/JPEG folders, ImageFolder trees, NPZ and HDF5 tile arrays, whole-slide
images (``slides.py``), and PathoROB metadata CSV + image root. Each input becomes a ``TileSet`` with
per-tile metadata."""

from __future__ import annotations

import csv
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.images import IMAGE_EXTENSIONS as IMAGE_EXT, image_files
from tubcli.images import read_rgb as read_image, say_rotated, to_uint8  # one tile rule, shared with pathorob
from tubcli.io import plain_name_problem

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
            return self._stack(self.paths[start:stop])
        if "array" in self.extra:  # NPZ: memory-mapped (or loaded) by read_array_file
            return _hwc(np.array(self.extra["array"][start:stop]), self.array_file)  # a copy, not a view of the file
        import h5py

        with h5py.File(self.array_file, "r") as f:
            return _hwc(f[self.array_key][start:stop], self.array_file)

    def read_indices(self, indices) -> np.ndarray:
        """The tiles at sorted, distinct ``indices`` as (n, H, W, 3) uint8 RGB, equal to those rows of
        ``read(0, len(self))`` but decoding only them: image files one by one, HDF5 and whole slides in
        runs of consecutive indices, NPZ rows of the array ``read_array_file`` memory-mapped (a
        compressed NPZ is loaded whole by ``read_array_file``)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.paths is not None and self.reader is None:
            return self._stack([self.paths[i] for i in idx])
        if self.reader is None and "array" in self.extra:
            return _hwc(np.asarray(self.extra["array"][idx]), self.array_file)
        runs = _runs(idx)
        if self.reader is not None:
            parts = [self.reader(a, b) for a, b in runs]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        import h5py

        with h5py.File(self.array_file, "r") as f:
            d = f[self.array_key]
            raw = d[runs[0][0]:runs[0][1]] if len(runs) == 1 else np.concatenate([d[a:b] for a, b in runs])
        return _hwc(raw, self.array_file)

    def check_image_sizes(self) -> None:
        """Every image file opens and has the first one's size, read from the headers (nothing decoded):
        training reads tiles on demand, and a stray file must fail before step 1, not when drawn."""
        from PIL import Image

        first = None
        for p in self.paths or []:
            try:
                with Image.open(p) as im:
                    size = im.size
            except Exception as exc:  # noqa: BLE001 - any reason PIL gives is the user's file
                raise TubError(f"cannot read image {p}: {str(exc).splitlines()[0][:200]}") from None
            if first is None:
                first = (p, size)
            elif size != first[1]:
                raise TubError(f"{p} is {size[0]}x{size[1]} px but {first[0]} is {first[1][0]}x{first[1][1]}; "
                               "the tiles of one input must share one size: resize them or embed them separately")

    def _stack(self, paths: list[Path]) -> np.ndarray:
        """Image files as one array; all tiles of an input must have the size of its first one, so a
        stray file of another size is named instead of failing inside ``np.stack``."""
        rotated = self.extra.setdefault("exif_rotated", [])
        images = [read_image(p, rotated if not rotated else None) for p in paths]  # the first one is enough
        first, shape = self.extra.setdefault("first_tile", (paths[0], images[0].shape))
        for p, im in zip(paths, images):
            if im.shape != shape:
                raise TubError(f"{p} is {im.shape[1]}x{im.shape[0]} px but {first} is {shape[1]}x{shape[0]}; "
                               "the tiles of one input must share one size: resize them or embed them separately")
        return np.stack(images)


def say_exif_rotated(ts: TileSet, log) -> bool:
    """A WARNING naming the first tile of ``ts`` read so far with an EXIF orientation other than 1; True when
    said (callers say it once per run)."""
    return say_rotated(ts.extra.get("exif_rotated", []), log)


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted distinct indices as [start, stop) runs of consecutive ones."""
    if not len(idx):
        return [(0, 0)]
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, breaks)]


class TileStream:
    """The tiles of one or more inputs as one sequence (input after input, as concatenating them would
    give), decoded on demand: ``take(idx)`` reads only the tiles at ``idx`` (each distinct one once),
    ``stream[a:b]`` a range, so training holds one step's tiles instead of the whole corpus. With
    several inputs each tile is C-contiguous, as a row of ``np.concatenate`` of them was."""

    def __init__(self, sets: list[TileSet]):
        self.sets = list(sets)
        self.starts = np.cumsum([0] + [len(ts) for ts in self.sets])
        self.contiguous = len(self.sets) > 1
        self.shape = None
        for ts in self.sets:  # image folders: every file's size from its header, before any step
            if ts.paths is not None and ts.reader is None:
                ts.check_image_sizes()
        if len(self.sets) > 1:  # as concatenating would have: every input's tiles of one size, checked up front
            for ts in self.sets:
                self._check(ts, ts.read(0, 1))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _check(self, ts: TileSet, arr: np.ndarray) -> None:
        if self.shape is None:
            self.shape = (ts.name, arr.shape[1:])
        elif arr.shape[1:] != self.shape[1]:
            (h, w), (h0, w0) = arr.shape[1:3], self.shape[1][:2]
            raise TubError(f"the tiles of input {ts.name} are {w}x{h} px but those of {self.shape[0]} are {w0}x{h0}; "
                           "the tiles of all training inputs must share one size: resize them or train on one")

    def take(self, indices) -> list[np.ndarray]:
        """The tiles at ``indices`` (any order, repeats allowed), in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"tile index out of range 0..{len(self) - 1}")
        uniq, inverse = np.unique(idx, return_inverse=True)
        which = np.searchsorted(self.starts, uniq, side="right") - 1
        got: list = [None] * len(uniq)
        for k in np.unique(which):
            pos = np.flatnonzero(which == k)
            ts = self.sets[k]
            arr = ts.read_indices(uniq[pos] - self.starts[k])
            if self.contiguous:
                self._check(ts, arr)
            for j, tile in zip(pos, arr):
                got[j] = np.ascontiguousarray(tile) if self.contiguous else tile
        return [got[i] for i in inverse.reshape(-1)]

    def __getitem__(self, key):
        if not isinstance(key, slice):
            i = int(key)
            return self.take([i + len(self) if i < 0 else i])[0]
        a, b, step = key.indices(len(self))
        if step != 1:
            return np.stack(self.take(np.arange(a, b, step)))
        parts = []
        for k, ts in enumerate(self.sets):
            lo, hi = max(a, int(self.starts[k])), min(b, int(self.starts[k + 1]))
            if lo < hi:
                arr = ts.read(lo - int(self.starts[k]), hi - int(self.starts[k]))
                if self.contiguous:
                    self._check(ts, arr)
                parts.append(arr)
        if not parts:
            return np.zeros((0, *(self.shape[1] if self.shape else (0, 0, 3))), np.uint8)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def take_tiles(tiles, indices) -> list[np.ndarray]:
    """The tiles at ``indices`` in order: rows of an in-memory (n, H, W, 3) array, or read on demand from a
    ``TileStream``."""
    if isinstance(tiles, np.ndarray):
        return [tiles[i] for i in indices]
    return tiles.take(indices)


def _hwc(arr: np.ndarray, src) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise TubError(f"{src}: tile array must be (N, H, W, 3) or (N, 3, H, W), got {arr.shape}")
    return to_uint8(arr, src)


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
    """Flat image folder, or an ImageFolder tree ``root/<class>/**/*.png`` (label = class folder), read
    as ``tubcli.images.image_files`` finds them (symlinked folders followed, hidden ones skipped)."""
    from .slides import SLIDE_EXT, is_pyramid

    files = image_files(root)
    tiffs = [p for p in files if p.suffix.lower() in (".tif", ".tiff")]
    slide = next((p for p in tiffs[:8] if is_pyramid(p)), None) if files else next(
        (p for p in root.rglob("*") if p.suffix.lower() in SLIDE_EXT and p.is_file() and is_pyramid(p)), None)
    if slide is not None:  # a Camelyon-style tree root/<class>/*.tif: not tiles, each slide would become one
        raise TubError(f"{slide} is a whole slide, not a tile; give the folders that hold the slides (e.g. "
                       f"{slide.parent}) or the slides themselves as inputs")
    if not files:
        raise TubError(f"{root} contains no PNG/JPEG/TIFF tiles")
    top_level = [p for p in files if p.parent == root]
    image_folder = len(top_level) < len(files)  # a tree of class folders, as torchvision's ImageFolder reads it
    if top_level and image_folder:  # a stray overview.png at its top made every tile unlabelled
        import logging

        logging.getLogger("tub").warning(
            "%s: %d image(s) at the top of a tree of class folders are left out (%s%s), as torchvision's "
            "ImageFolder leaves them: the labels are the folders' names; move them into a class folder or out "
            "of %s", root, len(top_level), ", ".join(p.name for p in top_level[:3]), ", ..." if len(top_level) > 3
            else "", root)
        files = [p for p in files if p.parent != root]
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


def _npz_arrays(path: Path, wanted) -> tuple[str, dict[str, np.ndarray]]:
    """The tile array's key and the arrays of ``wanted`` keys that an NPZ holds; unreadable files and
    pickled (object) arrays are one-line errors."""
    if not zipfile.is_zipfile(path):
        raise TubError(f"{path} is not an .npz archive (a zip of .npy arrays); write it with numpy.savez")
    with np.load(path) as z:
        keys = list(z.keys())
        key = next((k for k in ARRAY_KEYS if k in keys), None)
        if key is None:
            raise TubError(f"{path}: no tile array (one of {ARRAY_KEYS}); keys are {keys}")
        arrays = {}
        mapped = _npz_memmap(path, key)
        if mapped is not None:  # stored uncompressed (numpy.savez): tiles are read from the file when used
            arrays[key] = mapped
        for k in [*([] if mapped is not None else [key]), *(k for k in keys if k in wanted)]:
            try:
                arrays[k] = z[k]
            except Exception as exc:  # noqa: BLE001 - numpy's reasons (pickled objects, corrupt member)
                raise TubError(f"{path}: cannot load array {k!r} ({str(exc).splitlines()[0]}); store numbers, "
                               "and text as a numpy string array (dtype=str)") from None
    return key, arrays


def _npz_memmap(path: Path, key: str) -> np.ndarray | None:
    """The NPZ member ``key`` memory-mapped (read-only) when it is stored uncompressed and holds no
    Python objects (what ``numpy.savez`` writes), so a large tile array is not loaded whole; None
    otherwise (compressed members are loaded)."""
    import struct

    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if dtype.hasobject or 0 in shape or offset + dtype.itemsize * int(np.prod(shape)) > path.stat().st_size:
            return None
        return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)
    except (KeyError, ValueError, OSError, struct.error):
        return None


def _h5_arrays(path: Path, wanted) -> tuple[str, int, dict[str, np.ndarray]]:
    """The tile dataset's key and length (tiles are read lazily) and the ``wanted`` datasets."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise TubError(f"cannot open HDF5 file {path}: {exc}") from exc
    with f:
        key = next((k for k in ARRAY_KEYS if k in f), None)
        if key is None:
            raise TubError(f"{path}: no tile dataset (one of {ARRAY_KEYS}); datasets are {list(f)}")
        return key, len(f[key]), {k: f[k][()] for k in f if k in wanted and hasattr(f[k], "shape")}


META_KEYS = LABEL_KEYS + ("slide_id", "patch_id", "coords")


def read_array_file(path: Path) -> TileSet:
    """NPZ (``tiles``/``imgs``/``images``) or HDF5 (``imgs``/``tiles`` + ``coords``) tile arrays, with
    optional per-tile ``labels``, ``slide_id``, ``patch_id``, ``coords`` (one entry per tile)."""
    if path.suffix.lower() == ".npz":
        key, meta = _npz_arrays(path, META_KEYS)
        array = meta.pop(key)
        n, extra = len(array), {"array": array}
    else:
        key, n, meta = _h5_arrays(path, META_KEYS)
        extra = {}
    if n == 0:
        raise TubError(f"{path}: the tile array {key!r} is empty (0 tiles)")
    for k, v in meta.items():
        if np.ndim(v) == 0 or len(v) != n:
            raise TubError(f"{path}: {k!r} has {np.size(v)} entries for {n} tiles; give one per tile or drop it")
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
    return TileSet(name=path.stem, rows=rows, array_file=path, array_key=key, extra=extra)


ARRAY_EXT = (".npz", ".h5", ".hdf5")


def input_name(path: Path) -> str:
    """The name of an input's outputs: a folder's name or a file's stem. It depends on the path alone,
    so a rerun with other arguments finds the same outputs."""
    path = Path(path)
    return path.resolve().name if path.is_dir() else path.stem


def check_input(path: Path) -> None:
    """Before any reading: the input exists and is of a kind tub reads (a folder, .npz/.h5, a whole
    slide or an image). Problems with its contents show up when it is read."""
    from .slides import SLIDE_EXT

    if not path.exists():
        raise TubError(f"input {path} does not exist; give tile folders, .npz/.h5 files or whole slides")
    if not (path.is_dir() or path.suffix.lower() in ARRAY_EXT + tuple(SLIDE_EXT | IMAGE_EXT)):
        raise TubError(f"{path}: unsupported input; use a tile folder, an ImageFolder tree, .npz/.h5 or a "
                       "whole slide (.svs, .ndpi, .mrxs, pyramidal .tif, ...)")


def read_input(path: str | Path, slide_options: dict | None = None) -> TileSet:
    """One input -> TileSet; ``slide_options`` (tile_px, mpp, level, tissue_min) apply to whole slides."""
    from .slides import SLIDE_EXT, is_whole_slide, read_slide

    path = Path(path)
    check_input(path)
    if path.is_dir():
        return read_folder(path)
    if path.suffix.lower() in ARRAY_EXT:
        return read_array_file(path)
    if is_whole_slide(path):
        return read_slide(path, **(slide_options or {}))
    if path.suffix.lower() in SLIDE_EXT - IMAGE_EXT:
        raise TubError(f"OpenSlide cannot read {path}; is it a complete whole-slide file?")
    return TileSet(name=path.stem, rows=[_row_from_name(path, None, path.parent)], paths=[path])


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
    stems: dict[str, str] = {}  # file stem -> the center written there
    for r in rows:
        center = r["medical_center"]
        if center not in groups:
            stem = center_file_stem(center, csv_path)
            if stem in stems:
                raise TubError(f"{csv_path}: medical centers {stems[stem]!r} and {center!r} would both be written "
                               f"to {stem}.npz (spaces become '_'); rename one of them in the metadata")
            stems[stem] = center
            groups[center] = TileSet(name=stem, rows=[], paths=[])
        if path_col:
            p = root / r[path_col]
        else:
            p = _find_image(root, r)
        if not p.is_file():
            raise TubError(f"no image for slide {r['slide_id']} patch {r['patch_id']} under {root}; "
                           "add a 'path' column or use {root}/{slide_id}/{patch_id}.png")
        ts = groups[center]
        ts.rows.append({"tile_id": f"{r['slide_id']}-{r['patch_id']}", "origin": str(p),
                        "label": r["biological_class"], "slide_id": r["slide_id"], "patch_id": r["patch_id"],
                        "x": -1, "y": -1, "medical_center": center, "subset": r.get("subset", "")})
        ts.paths.append(p)
    return groups


NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, ...)
# longest name written per input or center: atomic_path's temporary ".tmp-<stem>-<8 random>.geojson" (QC)
MAX_STEM_BYTES = NAME_MAX - len(".tmp--XXXXXXXX.geojson")


def too_long(stem: str) -> str:
    """Why ``stem`` is too long to name output files ('' when it is not)."""
    size = len(os.fsencode(stem))
    return f"{size} bytes in UTF-8, at most {MAX_STEM_BYTES}" if size > MAX_STEM_BYTES else ""


def center_file_stem(center: str, source: Path | str = "metadata") -> str:
    """The stem of a center's ``{center}.npz``: spaces become '_', as ``tub pathorob`` and the official
    scripts look the file up. A center that is not one plain file name (empty, '.', '..', a path
    separator) is an error, so that nothing is written outside the run's outputs folder."""
    stem = center.replace(" ", "_")
    why = plain_name_problem(stem)
    if why:
        raise TubError(f"{source}: medical_center {center!r} cannot name a {{center}}.npz file ({why}); "
                       "rename the center in the metadata")
    if too_long(stem):
        raise TubError(f"{source}: medical_center {center[:32]!r}... is too long for a file name "
                       f"({too_long(stem)}); rename the center in the metadata")
    return stem


# the image suffixes a folder of tiles is read with, in the order looked for (upper-case too: .PNG, .TIF)
FIND_EXTENSIONS = tuple(e for ext in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
                        for e in (ext, ext.upper()))


def _find_image(root: Path, r: dict) -> Path:
    s, p, c = r["slide_id"], r["patch_id"], r["medical_center"]
    for base in (root, root / "images"):
        for ext in FIND_EXTENSIONS:
            for cand in (base / s / f"{p}{ext}", base / c / s / f"{p}{ext}", base / f"{s}-{p}{ext}",
                         base / f"{p}{ext}"):
                if cand.is_file():
                    return cand
    return root / s / f"{p}.png"
