"""Feature readers and writers for the layouts PathoROB users have.

* **official**: a folder with one ``{medical_center}.npz`` per center (spaces -> ``_``), npz key
  ``f"{slide_id}-{patch_id}"`` -> 1-D vector; rows assembled in metadata order (PathoROB
  ``FeatureDataManager``; also what ``tub atlas embed --format pathorob`` writes).
* **plain**: ``features.npy`` (N, D) or an ``.npz`` with one array (or key ``features``/``embeddings``),
  row-aligned with the metadata CSV.
* **atlas npy**: a folder with ``embeddings.npy`` + ``manifest.csv`` (``tub atlas embed --format npy``);
  rows are matched to the metadata by ``(slide_id, patch_id)`` when the manifest has them.
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
        holds = any(out.glob("*.npz")) or (out / "embeddings.npy").is_file() or (out / "features.npy").is_file()
        where = [out] if holds else sorted(d for d in out.iterdir() if d.is_dir() and not d.name.startswith("."))
        raise TubError(f"{path} is a run directory; give the features in it ({', '.join(map(str, where[:3])) or out})")
    if (path / "embeddings.npy").is_file():
        return "atlas"
    if any(path.glob("*.npz")):
        return "official"
    if (path / "features.npy").is_file():
        return "plain-dir"
    raise TubError(f"{path}: folder has no per-center .npz files and no embeddings.npy; check the path")


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


def _align_manifest(manifest: Metadata, meta: Metadata, X: np.ndarray, src: Path) -> np.ndarray:
    if "slide_id" in manifest.columns and "patch_id" in manifest.columns:
        index = {k: i for i, k in enumerate(manifest.keys())}
        missing = [k for k in meta.keys() if k not in index]
        if missing:
            raise TubError(
                f"{src}: {len(missing)} metadata row(s) are not in manifest.csv, e.g. {missing[0]!r} (unknown slide id?)"
            )
        return X[[index[k] for k in meta.keys()]]
    if len(manifest) != len(meta):
        raise TubError(f"{src}: manifest has {len(manifest)} rows but the metadata {len(meta)}; they must match")
    return X


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


def load_features(path: Path | str, meta: Metadata | None) -> tuple[np.ndarray, Metadata]:
    """Features (N, D) in metadata row order, and the metadata (from the atlas manifest if not given)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "atlas":
        X = _load_plain_array(path / "embeddings.npy")
        man_path = path / "manifest.csv"
        if meta is None:
            if not man_path.is_file():
                raise TubError(f"{path}: embeddings.npy without manifest.csv; pass --metadata CSV")
            man = _read_manifest(man_path)
            if "biological_class" not in man.columns and "label" in man.columns:  # tub atlas manifest
                man.columns["biological_class"] = man.columns["label"]
            missing = [c for c in ("slide_id", "patch_id", "biological_class", "medical_center") if c not in man.columns]
            if missing:
                raise TubError(f"{man_path}: manifest lacks {', '.join(missing)}; pass --metadata CSV (PathoROB columns)")
            meta = Metadata.from_columns(str(man_path), **man.columns)
        elif man_path.is_file():
            X = _align_manifest(_read_manifest(man_path), meta, X, path)
    elif meta is None:
        meta_guess = path / "metadata.csv" if path.is_dir() else path.with_name("metadata.csv")
        if not meta_guess.is_file():
            raise TubError(f"{path}: no metadata given; pass --metadata CSV (5 PathoROB columns)")
        meta = read_metadata(meta_guess)
    if layout == "official":
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
    official and atlas layouts; the ``.npy`` and the ``metadata.csv`` beside it for the plain layout)."""
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
