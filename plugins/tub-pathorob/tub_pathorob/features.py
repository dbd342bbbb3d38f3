"""Feature readers and writers for the layouts PathoROB users have.

* **official**: a folder with one ``{medical_center}.npz`` per center (spaces -> ``_``), npz key
  ``f"{slide_id}-{patch_id}"`` -> 1-D vector; rows assembled in metadata order (PathoROB
  ``FeatureDataManager``; also what ``tub atlas embed --format pathorob`` writes).
* **plain**: ``features.npy`` (N, D) or an ``.npz`` with one array (or key ``features``/``embeddings``),
  row-aligned with the metadata CSV.
* **atlas npy**: a folder with ``embeddings.npy`` + ``manifest.csv`` (``tub atlas embed --format npy``);
  rows are matched to the metadata by ``(slide_id, patch_id)`` when the manifest has them. A folder of
  such folders (``--format npy`` on whole slides: one per slide) is read as one input, matched the same way.
* **per-slide h5**: a folder of ``<slide_id>.h5`` files with ``features`` (N, D) and ``coords`` (N, 2)
  (``tub atlas embed --format h5`` on slides, tub xmil, CLAM, TRIDENT); the patch_id of row i is
  ``f"{x}_{y}"`` of its level-0 coords, as tub atlas names whole-slide tiles. The metadata may be
  slide-level (no patch_id): each row then stands for all tiles of its slide.
"""

from __future__ import annotations

import struct
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from tubcli.errors import TubError, first_line
from tubcli.io import load_numpy, plain_name_problem

from .metadata import Metadata, read_metadata

ARRAY_KEYS = ("features", "embeddings", "X")


def center_file_name(center: str) -> str:
    """``{center}.npz`` (spaces become '_', as the official scripts name them). A center that is not one
    plain file name ('..', a path, a separator) is an error: features are read and written inside the
    features folder only, never at a path a metadata cell names."""
    stem = center.replace(" ", "_")
    why = plain_name_problem(stem)
    if why:
        raise TubError(f"medical_center {center!r} cannot name a {{center}}.npz file in the features folder "
                       f"({why}); rename the center in the metadata")
    return f"{stem}.npz"


def detect_layout(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise TubError(f"features not found: {path}; pass a .npy/.npz file or a folder of per-center .npz files")
    if path.is_file():
        if path.suffix in (".npy", ".npz"):
            return "plain"
        raise TubError(f"{path}: unsupported features file (expected .npy or .npz)")
    if (path / "env.json").is_file() and (path / "outputs").is_dir():  # a tub run: its files are not features
        out = path / "outputs"
        holds = (any(out.glob("*.npz")) or (out / "embeddings.npy").is_file() or (out / "features.npy").is_file()
                 or bool(_h5_files(out)) or bool(_atlas_dirs(out)))
        where = [out] if holds else sorted(d for d in out.iterdir() if d.is_dir() and not d.name.startswith("."))
        raise TubError(f"{path} is a run directory; give the features in it ({', '.join(map(str, where[:3])) or out})")
    if (path / "embeddings.npy").is_file():
        return "atlas"
    if any(path.glob("*.npz")):
        return "official"
    if (path / "features.npy").is_file():
        return "plain-dir"
    if _h5_files(path):
        return "h5"
    if _atlas_dirs(path):
        return "atlas-dirs"
    raise TubError(f"{path}: folder has no per-center .npz files, no embeddings.npy (or sub-folders with one) and "
                   "no per-slide .h5 features; check the path")


def _h5_files(folder: Path) -> dict[str, Path]:
    """Per-slide feature files in ``folder``: slide id (file stem) -> path. Hidden files (unfinished writes)
    are left out; two files of one slide are an error, since either could be meant."""
    files: dict[str, Path] = {}
    for q in sorted(folder.iterdir()):
        if q.suffix in (".h5", ".hdf5") and not q.name.startswith(".") and q.is_file():
            if q.stem in files:
                raise TubError(f"{folder}: {files[q.stem].name} and {q.name} are both slide {q.stem!r}; keep one")
            files[q.stem] = q
    return files


def _atlas_dirs(folder: Path) -> list[Path]:
    """Sub-folders holding an atlas npy output (``tub atlas embed --format npy`` writes one per slide)."""
    return sorted(d for d in folder.iterdir()
                  if not d.name.startswith(".") and d.is_dir() and (d / "embeddings.npy").is_file())


def _load_plain_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            X = load_numpy(path)
        else:
            with load_numpy(path) as z:
                names = list(z.files)
                key = next((k for k in ARRAY_KEYS if k in names), names[0] if len(names) == 1 else None)
                if key is None:
                    raise TubError(
                        f"{path}: npz has {len(names)} arrays and none named {'/'.join(ARRAY_KEYS)}; "
                        "for per-slide keys give the folder of per-center npz files instead"
                    )
                X = z[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise TubError(f"{path}: cannot read features ({first_line(e)})") from None
    if X.ndim != 2:
        raise TubError(f"{path}: features must be a 2-D (N, D) array, got shape {X.shape}")
    return X


_CENTRAL_ENTRY = struct.Struct("<4s24xHHH")  # zip central directory entry: signature ... name/extra/comment length


def _zip_directory(data: bytes) -> dict[bytes, int] | None:
    """``{member name: offset of its central directory entry}`` read straight from the zip's central
    directory (zipfile builds a ZipInfo object per member, the bulk of the time for 20k small members;
    only ints are stored, so the garbage collector has no new containers to scan); None for zip64 or
    unusual archives, which then go through zipfile."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if end < 0 or len(data) < end + 22:
        return None
    n_entries, size, offset = struct.unpack_from("<HII", data, end + 10)
    if n_entries == 0xFFFF or 0xFFFFFFFF in (size, offset) or offset + size > end:
        return None
    out, p, unpack = {}, offset, _CENTRAL_ENTRY.unpack_from
    for _ in range(n_entries):
        sig, name_len, extra_len, comment_len = unpack(data, p)
        if sig != b"PK\x01\x02":
            return None
        out[data[p + 46:p + 46 + name_len]] = p
        p += 46 + name_len + extra_len + comment_len
    return out


def _le(u8: np.ndarray, pos: np.ndarray, nbytes: int) -> np.ndarray:
    """Little-endian unsigned integers of ``nbytes`` bytes at byte positions ``pos``."""
    b = u8[pos[:, None] + np.arange(nbytes)].astype(np.int64)
    return (b << (8 * np.arange(nbytes))).sum(1)


def _read_npz_matrix(data: bytes, keys: list[str]) -> np.ndarray | None:
    """Rows ``keys`` of an ``np.savez`` file of same-shape 1-D arrays as one (len(keys), D) array, without
    a Python object per member: offsets from the central directory, one npy header parsed and compared
    byte-wise with all others, payloads sliced out of the file bytes. None if anything is unusual (a
    missing key, compression, another header), so that the caller takes the general path."""
    import io

    directory = _zip_directory(data)
    if directory is None or not keys:
        return None
    try:
        central = np.array([directory[f"{k}.npy".encode()] for k in keys], dtype=np.int64)
    except (KeyError, UnicodeEncodeError):
        return None
    u8 = np.frombuffer(data, dtype=np.uint8)
    method, usize, local = _le(u8, central + 10, 2), _le(u8, central + 24, 4), _le(u8, central + 42, 4)
    if np.any(method != zipfile.ZIP_STORED) or np.any(usize != usize[0]) or np.any(local == 0xFFFFFFFF):
        return None
    if np.any(local + 30 > len(data)):
        return None
    if not np.all(u8[local[:, None] + np.arange(4)] == np.frombuffer(b"PK\x03\x04", np.uint8)):
        return None
    begin = local + 30 + _le(u8, local + 26, 2) + _le(u8, local + 28, 2)
    size = int(usize[0])
    if np.any(begin + size > len(data)):
        return None
    fh = io.BytesIO(data[begin[0]:begin[0] + size])
    try:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
    except ValueError:
        return None
    hlen = fh.tell()
    if len(shape) != 1 or dtype.hasobject or fortran or hlen + shape[0] * dtype.itemsize != size:
        return None
    header = np.frombuffer(data, dtype=np.uint8, count=hlen, offset=int(begin[0]))
    if not np.all(u8[begin[:, None] + np.arange(hlen)] == header):
        return None
    payload = b"".join([data[b:b + size - hlen] for b in (begin + hlen).tolist()])
    return np.frombuffer(payload, dtype=dtype).reshape(len(keys), shape[0])


def _read_npz_vectors(path: Path, keys: list[str]) -> list[np.ndarray]:
    """Read many same-shape 1-D arrays from an ``np.savez`` file: the file is read once, the npy header
    of the first member is parsed once, and every stored (uncompressed) member with an identical header
    becomes a view of the file bytes; anything else goes through ``np.load``. Missing keys raise KeyError."""
    import io
    import struct

    data = Path(path).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = {i.filename: i for i in zf.infolist()}
    out, header, dtype, shape, slow = [], None, None, None, None
    for key in keys:
        info = names.get(f"{key}.npy")
        if info is None:
            raise KeyError(key)
        raw = None
        if info.compress_type == zipfile.ZIP_STORED:
            off = info.header_offset
            name_len, extra_len = struct.unpack_from("<HH", data, off + 26)
            begin = off + 30 + name_len + extra_len
            raw = memoryview(data)[begin:begin + info.file_size]
            if header is None:
                fh = io.BytesIO(raw)
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(fh)
                if len(shape) == 1 and not dtype.hasobject and not fortran:
                    header = bytes(raw[: fh.tell()])
        if (raw is not None and header is not None and len(raw) == len(header) + shape[0] * dtype.itemsize
                and raw[: len(header)] == header):
            out.append(np.frombuffer(raw, dtype=dtype, offset=len(header)))
        else:
            if slow is None:
                slow = np.load(path, allow_pickle=False)
            out.append(slow[key])
    if slow is not None:
        slow.close()
    return out


def _load_official(folder: Path, meta: Metadata) -> np.ndarray:
    keys = meta.keys()
    centers = meta.medical_center
    out = None
    for center in dict.fromkeys(centers):  # first-appearance order, as the reference
        f = folder / center_file_name(center)
        if not f.is_file() and (folder / f"{center}.npz").is_file():
            f = folder / f"{center}.npz"  # a writer that kept the spaces
        if not f.is_file():
            raise TubError(f"{folder}: no features for center {center!r} (expected {f.name}); check FEATURES")
        rows = np.flatnonzero(centers == center)
        fast = _read_npz_matrix(f.read_bytes(), [keys[i] for i in rows])
        if fast is not None:
            if out is None:
                out = np.empty((len(meta), fast.shape[1]), dtype=fast.dtype)
            if fast.shape[1] != out.shape[1]:
                raise TubError(f"{f}: features have {fast.shape[1]} dimensions, other centers {out.shape[1]}")
            out[rows] = fast
            continue
        try:
            vectors = _read_npz_vectors(f, [keys[i] for i in rows])
        except KeyError as e:
            missing = [keys[i] for i in rows if keys[i] == e.args[0]]
            raise TubError(
                f"{f}: metadata row(s) have no feature, e.g. slide-patch {missing[0]!r}; "
                "the metadata and the features do not match (unknown slide id?)"
            ) from None
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise TubError(f"{f}: cannot read npz ({str(e).splitlines()[0]})") from None
        if out is None and vectors:  # the common length, so the odd vector out is the one named
            dim = Counter(v.shape[0] for v in vectors if v.ndim == 1).most_common(1)
            out = np.empty((len(meta), dim[0][0] if dim else vectors[0].shape[-1]), dtype=vectors[0].dtype)
        for i, v in zip(rows, vectors):
            if v.ndim != 1 or v.shape[0] != out.shape[1]:
                raise TubError(f"{f}: feature {keys[i]!r} has shape {v.shape}, expected ({out.shape[1]},) "
                               "like the others")
            out[i] = v
    return out


def _manifest_rows(manifest: Metadata, meta: Metadata, src: Path, where: str = "manifest.csv") -> np.ndarray | None:
    """The manifest row of each metadata row, by ``(slide_id, patch_id)``; None when the manifest has no such
    keys (then it must be row-aligned)."""
    if "slide_id" in manifest.columns and "patch_id" in manifest.columns:
        index = {k: i for i, k in enumerate(manifest.keys())}
        missing = [k for k in meta.keys() if k not in index]
        if missing:
            raise TubError(
                f"{src}: {len(missing)} metadata row(s) are not in {where}, e.g. {missing[0]!r} (unknown slide id?)"
            )
        return np.array([index[k] for k in meta.keys()], dtype=np.int64)
    return None


def _align_manifest(manifest: Metadata, meta: Metadata, X: np.ndarray, src: Path) -> np.ndarray:
    rows = _manifest_rows(manifest, meta, src)
    if rows is not None:
        return X[rows]
    if len(manifest) != len(meta):
        raise TubError(f"{src}: manifest has {len(manifest)} rows but the metadata {len(meta)}; they must match")
    return X


def _manifest_metadata(man: Metadata, man_path: Path) -> Metadata:
    """An atlas manifest as the metadata (``label`` is the class), when no ``--metadata`` is given."""
    if "biological_class" not in man.columns and "label" in man.columns:  # tub atlas manifest
        man.columns["biological_class"] = man.columns["label"]
    missing = [c for c in ("slide_id", "patch_id", "biological_class", "medical_center") if c not in man.columns]
    if missing:
        raise TubError(f"{man_path}: manifest lacks {', '.join(missing)}; pass --metadata CSV (PathoROB columns)")
    return Metadata.from_columns(str(man_path), **man.columns)


def _load_atlas_dirs(folder: Path, meta: Metadata | None) -> tuple[np.ndarray, Metadata]:
    """A folder of atlas npy folders (``tub atlas embed --format npy`` on slides: one per slide) as one
    input: the manifests, concatenated in folder order, are matched to the metadata as one folder's
    manifest is; each embeddings.npy is read once and only its matched rows kept."""
    dirs = _atlas_dirs(folder)
    mans = []
    for d in dirs:
        if not (d / "manifest.csv").is_file():
            raise TubError(f"{d}: embeddings.npy without manifest.csv; each sub-folder needs its manifest "
                           "(slide_id, patch_id) to be matched to the metadata")
        man = _read_manifest(d / "manifest.csv")
        if "slide_id" not in man.columns or "patch_id" not in man.columns:
            raise TubError(f"{d / 'manifest.csv'}: no slide_id/patch_id columns to match the metadata on")
        mans.append(man)
    common = [c for c in mans[0].columns if all(c in m.columns for m in mans)]
    man = Metadata({c: np.concatenate([m.columns[c] for m in mans]) for c in common}, str(folder))
    if meta is None:
        meta = _manifest_metadata(man, folder)
        rows = np.arange(len(man))
    else:
        rows = _manifest_rows(man, meta, folder, "any sub-folder's manifest.csv")
    out, start = None, 0
    for d, m in zip(dirs, mans):
        X = _load_plain_array(d / "embeddings.npy")
        if len(X) != len(m):
            raise TubError(f"{d}: embeddings.npy has {len(X)} rows but manifest.csv {len(m)}; they must match")
        out = np.empty((len(rows), X.shape[1]), dtype=X.dtype) if out is None else out
        if X.shape[1] != out.shape[1]:
            raise TubError(f"{d}: embeddings have {X.shape[1]} dimensions, those of {dirs[0].name} {out.shape[1]}")
        take = np.flatnonzero((rows >= start) & (rows < start + len(m)))
        out[take] = X[rows[take] - start]
        start += len(m)
    return out, meta


def _read_h5_slide(path: Path, patches: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """The rows of one slide's features h5 whose patch_id (``x_y`` of coords) is in ``patches``, in that
    order, or all rows (None), with their patch ids. One open per slide; the features are read as one
    contiguous span (h5py's point selections are slow) and the rows picked in memory."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise TubError(f"{path}: cannot be read as HDF5 ({first_line(e)})") from None
    with f:
        if "features" not in f or "coords" not in f:
            raise TubError(f"{path}: needs datasets 'features' (N, D) and 'coords' (N, 2), has {list(f) or 'none'}; "
                           "give per-slide features of tub atlas embed --format h5, tub xmil, CLAM or TRIDENT")
        feats, coords = f["features"], f["coords"][()]
        if feats.ndim != 2 or coords.shape != (feats.shape[0], 2):
            raise TubError(f"{path}: 'features' {feats.shape} and 'coords' {coords.shape} must be (N, D) and (N, 2)")
        if coords.size and not (np.all(coords >= 0) and np.array_equal(coords, np.floor(coords))):
            raise TubError(f"{path}: coords are not non-negative integer level-0 positions (tub atlas writes -1 for "
                           "tiles without one); embed whole slides, or give tile inputs as --format npy/pathorob")
        names = [f"{x}_{y}" for x, y in coords.astype(np.int64).tolist()]
        index: dict[str, int] = {}
        for i, p in enumerate(names):
            if index.setdefault(p, i) != i:
                raise TubError(f"{path}: tile {p} (x_y of coords) is in rows {index[p]} and {i}; each tile must be "
                               "there once: extract the slide's features again")
        if patches is None:
            rows = np.arange(len(names))
        else:
            missing = [p for p in patches if p not in index]
            if missing:
                raise TubError(f"{path}: {len(missing)} metadata row(s) of slide {path.stem} have no tile there, e.g. "
                               f"patch_id {missing[0]!r}; patch_id must be f\"{{x}}_{{y}}\" of the h5 coords (level-0 "
                               "top-left), e.g. " + repr(names[0] if names else "1024_2048"))
            rows = np.array([index[p] for p in patches], dtype=np.int64)
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if rows.size else (0, 0)
        X = feats[lo:hi][rows - lo]
    return X, [names[i] for i in rows]


def _load_h5(folder: Path, meta: Metadata) -> tuple[np.ndarray, Metadata]:
    """A folder of per-slide features h5 files: rows matched to the metadata's (slide_id, patch_id) in
    metadata order. Slide-level metadata (no patch_id) is expanded to every tile of each slide, in file
    order: classes and centers are slide properties, the RI neighbourhoods are over tiles."""
    from tubcli.progress import get_logger

    files = _h5_files(folder)
    by_slide: dict[str, list[int]] = {}
    for i, s in enumerate(meta.slide_id):
        by_slide.setdefault(s, []).append(i)
    absent = [s for s in by_slide if s not in files]
    if absent:
        raise TubError(f"{folder}: no features file for slide_id {absent[0]!r} (expected {absent[0]}.h5; "
                       f"{len(absent)} slide(s) of the metadata have none); check the slide ids (unknown slide id?)")
    unused = [s for s in files if s not in by_slide]
    if unused:
        get_logger().info("%s: %d of %d slide file(s) are not named by the metadata and not read (e.g. %s)",
                          folder, len(unused), len(files), files[unused[0]].name)
    slide_level = "patch_id" not in meta.columns
    read = {s: _read_h5_slide(files[s], None if slide_level else meta.patch_id[rows])
            for s, rows in by_slide.items()}
    first = next(iter(read))
    dim = read[first][0].shape[1]
    for s, (X, _) in read.items():
        if X.shape[1] != dim:
            raise TubError(f"{files[s]}: features have {X.shape[1]} dimensions, those of {files[first].name} {dim}; "
                           "give features of one model")
    if slide_level:
        counts = [len(read[s][1]) for s in meta.slide_id]
        tiles = meta.take(np.repeat(np.arange(len(meta)), counts))
        tiles.columns["patch_id"] = np.array([p for s in meta.slide_id for p in read[s][1]], dtype=object)
        get_logger().info("%s: slide-level metadata, %d tile rows from %d slides (patch_id = x_y of the h5 coords)",
                          meta.source, len(tiles), len(by_slide))
        return np.concatenate([read[s][0] for s in meta.slide_id]), tiles
    out = np.empty((len(meta), dim), dtype=np.result_type(*(X.dtype for X, _ in read.values())))
    for s, rows in by_slide.items():
        out[rows] = read[s][0]
    return out, meta


def _write_manifest_like(src: Path, dst: Path, meta: Metadata) -> None:
    """The input manifest's own columns (tub atlas reads ``label``, ``origin``, ``split`` from them), its rows
    in the order of the features written (the metadata's): a robustified atlas folder stays an atlas folder."""
    import csv
    import io

    from tubcli.io import write_text

    with open(src, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if "slide_id" in header and "patch_id" in header:  # rows matched by key on reading (Metadata.keys)
        s, p = header.index("slide_id"), header.index("patch_id")
        index = {f"{r[s]}-{r[p]}": i for i, r in enumerate(body)}
        body = [body[index[k]] for k in meta.keys()]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *body])
    write_text(dst, buf.getvalue())


def _read_manifest(path: Path) -> Metadata:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise TubError(f"{path}: manifest.csv is empty")
    header, body = rows[0], rows[1:]
    return Metadata({h: np.array([r[j] for r in body], dtype=object) for j, h in enumerate(header)}, str(path))


def read_inputs(path: Path | str, metadata: Path | str | None) -> tuple[np.ndarray, Metadata]:
    """:func:`load_features` with the metadata CSV read here: per-slide h5 features name their own tiles,
    so for them the CSV may be slide-level (no patch_id)."""
    slide_level = metadata is not None and detect_layout(Path(path)) == "h5"
    return load_features(path, None if metadata is None else read_metadata(metadata, slide_level=slide_level))


def load_features(path: Path | str, meta: Metadata | None) -> tuple[np.ndarray, Metadata]:
    """Features (N, D) in metadata row order, and the metadata (from the atlas manifest if not given; per-slide
    h5 features with slide-level metadata: expanded to one row per tile)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "atlas":
        X = _load_plain_array(path / "embeddings.npy")
        man_path = path / "manifest.csv"
        if meta is None:
            if not man_path.is_file():
                raise TubError(f"{path}: embeddings.npy without manifest.csv; pass --metadata CSV")
            meta = _manifest_metadata(_read_manifest(man_path), man_path)
        elif man_path.is_file():
            X = _align_manifest(_read_manifest(man_path), meta, X, path)
    elif layout == "atlas-dirs":
        X, meta = _load_atlas_dirs(path, meta)
    elif meta is None:
        meta_guess = path / "metadata.csv" if path.is_dir() else path.with_name("metadata.csv")
        if not meta_guess.is_file():
            raise TubError(f"{path}: no metadata given; pass --metadata CSV (5 PathoROB columns)")
        meta = read_metadata(meta_guess, slide_level=layout == "h5")
    if layout == "h5":
        X, meta = _load_h5(path, meta)
    elif layout == "official":
        X = _load_official(path, meta)
    elif layout in ("plain", "plain-dir"):
        X = _load_plain_array(path if layout == "plain" else path / "features.npy")
    if X.shape[0] != len(meta):
        raise TubError(f"{path}: features have {X.shape[0]} rows but the metadata {len(meta)}; they must be row-aligned")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        raise TubError(f"{path}: feature row {r} (slide {meta.slide_id[r]}, patch {meta.patch_id[r]}, center "
                       f"{meta.medical_center[r]}) contains NaN or inf values ({int((~finite).sum())} row(s) in all); "
                       "fix or drop those rows")
    return X, meta


def write_official(folder: Path, X: np.ndarray, meta: Metadata) -> list[Path]:
    """One ``{center}.npz`` per medical center, key ``slide_id-patch_id`` (the reference layout)."""
    from tubcli.io import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = meta.keys()
    written = []
    for center in dict.fromkeys(meta.medical_center):
        rows = np.flatnonzero(meta.medical_center == center)
        out = folder / center_file_name(center)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{keys[i]: X[i] for i in rows})
        written.append(out)
    return written


def write_plain(path: Path, X: np.ndarray) -> None:
    from tubcli.io import atomic_path

    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, X)


def like_paths(src: Path, dst: Path) -> tuple[str, list[Path]]:
    """The layout of ``src`` and the paths :func:`write_like` writes for it under ``dst`` (a folder for the
    official and atlas layouts; the ``.npy`` and the ``metadata.csv`` beside it for the others: plain,
    and per-slide h5 or atlas sub-folders, whose rows are then the metadata's, one matrix)."""
    layout = detect_layout(Path(src))
    dst = Path(dst)
    if layout in ("official", "atlas"):
        return layout, [dst]
    out = dst / "features.npy" if dst.suffix != ".npy" else dst
    return layout, [out, out.with_name("metadata.csv")]


def write_like(src: Path, dst: Path, X: np.ndarray, meta: Metadata) -> Path:
    """Write features in the layout they were read from (official folder, atlas folder or plain .npy)."""
    layout, paths = like_paths(src, dst)
    out = paths[0]
    if layout == "official":
        write_official(out, X, meta)
    elif layout == "atlas":
        out.mkdir(parents=True, exist_ok=True)
        write_plain(out / "embeddings.npy", X)
        if (Path(src) / "manifest.csv").is_file():
            _write_manifest_like(Path(src) / "manifest.csv", out / "manifest.csv", meta)
        else:
            meta.write_csv(out / "manifest.csv")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_plain(out, X)
        meta.write_csv(paths[1])
    return out
