"""Reading embeddings + labels for probing: the layouts ``embed`` writes, and plain NPZ.

* a folder with ``embeddings.npy`` + ``manifest.csv`` (npy layout);
* a folder with eva's ``manifest.csv`` (origin, embeddings, target, split) + ``.pt`` tensors;
* a folder of PathoROB ``{center}.npz`` files + ``--metadata`` CSV (rows in metadata order);
* an ``.npz`` with ``features``/``embeddings`` and ``labels`` (optional ``slide_id``, ``split``);
* an ``embed --format h5`` file (``features``, ``label``, ``slide_id``), a TRIDENT/CLAM features h5
  (``features``, ``coords``; slide id = file stem), or a folder of such h5 files (one slide each);
* embed's ``slides.npz`` (one embedding per slide, key = slide id).

Inputs without labels take them from ``--labels CSV`` (``LabelTable``), matched on slide_id (and patch_id).

Every input is checked here, so that a bad one is a one-line error naming the file: features must be
finite (a NaN row silently turns the linear probe into NaN weights and skews kNN), and a ``split``
column, where there is one, must name a known split in every row (``SPLIT_ALIASES``; it is never
ignored in favour of a random split).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.io import load_numpy


# accepted split names (compared case-insensitively, surrounding spaces ignored) -> the split
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
PATHOROB_COLUMNS = ("slide_id", "patch_id", "biological_class", "medical_center")


@dataclass
class LabelledFeatures:
    x: np.ndarray  # (N, D) float32
    labels: list[str]  # "" where the input has none (``--labels`` may fill them in)
    slide_id: list[str]
    split: list[str] | None  # train/val/test per row; None when the input has no split column
    patch_id: list[str] | None = None  # per row where the input records it (h5: "x_y" of its coords)
    source: list[str] | None = None  # the file or folder each row was read from (predictions.csv, errors)
    per_slide: bool = False  # one row per slide (embed's slides.npz), not per tile


def split_column(source, values, first_line: int | None = None) -> list[str]:
    """``values`` mapped through ``SPLIT_ALIASES``; any other value (or an empty cell) is an error naming
    the row (0-based; ``first_line``: the file line of row 0, for CSV files) and the accepted names."""
    out = []
    for i, v in enumerate(values):
        v = v.decode() if isinstance(v, bytes) else str(v)
        name = SPLIT_ALIASES.get(v.strip().lower())
        if name is None:
            where = f"row {i}" + (f" (line {first_line + i})" if first_line is not None else "")
            raise TubError(f"{source}: {where} has split {v!r}; use train, val (or valid, validation) or "
                           "test in every row (any case), or drop the split column for a seeded split by slide")
        out.append(name)
    return out


def _csv_split(path: Path, rows: list[dict]) -> list[str] | None:
    """The split column of CSV ``rows`` (None without one); data rows start on line 2."""
    return split_column(path, [r["split"] or "" for r in rows], first_line=2) if rows and "split" in rows[0] else None


def _check_finite(path: Path, x: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(x).all(axis=tuple(range(1, x.ndim))))
    if bad.size:
        rows = ", ".join(map(str, bad[:5])) + (f", … ({bad.size} rows)" if bad.size > 5 else "")
        raise TubError(f"{path}: features of row(s) {rows} (0-based) are NaN or infinite; re-embed those tiles "
                       "or drop the rows")


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


FEATURE_KEYS = ("features", "embeddings", "x")
LABEL_KEYS = ("labels", "label", "y", "target")
LABELS_HINT = "--labels CSV (columns slide_id[,patch_id],label[,split])"


def read_features(path: Path, metadata: Path | None = None, labels: "LabelTable | None" = None) -> LabelledFeatures:
    """One input's rows, checked (finite features, a label for every row) before any probe runs.
    ``metadata`` (PathoROB CSV) is read by npy folders and PathoROB folders only; ``labels`` (``--labels``)
    attaches labels, and splits where it has them, to any input by slide_id (and patch_id)."""
    path = Path(path)
    if metadata is not None and labels is not None:
        raise TubError("--metadata and --labels both give labels; use --metadata for PathoROB {center}.npz "
                       "folders, --labels CSV for any other input (or an npy folder)")
    kind = feature_kind(path)
    if metadata is not None and kind not in ("npy", "pathorob"):
        raise TubError(f"--metadata (a PathoROB metadata CSV) is read for npy embedding folders and PathoROB "
                       f"{{center}}.npz folders only, and {path} is {KIND_NAMES[kind]}; label it with {LABELS_HINT}")
    feats = READERS[kind](path, metadata)
    if kind != "h5_folder":  # an h5 folder checks each file, naming it
        _check_finite(path, feats.x)
    if feats.source is None:  # absolute, as embed's origins: predictions.csv joins from any folder
        feats.source = [os.path.abspath(path)] * len(feats.x)
    if labels is not None:
        feats = labels.attach(path, feats)
    missing = [i for i, lab in enumerate(feats.labels) if lab == ""]
    if missing:
        src = feats.source[missing[0]]
        where = f"{path}" if src == os.path.abspath(path) else f"{src} (in {path})"
        raise TubError(f"{where} has no label for {len(missing)} of {len(feats.x)} row(s), e.g. slide "
                       f"{feats.slide_id[missing[0]]!r}; give {LABELS_HINT}")
    return feats


KIND_NAMES = {"npz": "an .npz", "h5": "an h5 file", "npy": "an npy embedding folder", "eva": "an eva folder",
              "eva_manifest": "an eva manifest",
              "pathorob": "a PathoROB folder", "h5_folder": "a folder of h5 feature files"}


def feature_kind(path: Path) -> str:
    """Which layout ``path`` holds, from its name and the files in it (nothing is read yet)."""
    if not path.exists():
        raise TubError(f"features {path} do not exist; give the output folder of 'tub atlas embed' or an .npz")
    if path.is_file() and path.suffix == ".npz":
        return "npz"
    if path.is_file() and path.suffix in (".h5", ".hdf5"):
        return "h5"
    if path.is_file() and path.suffix == ".csv":
        return "eva_manifest"
    if path.is_dir():
        if (path / "embeddings.npy").is_file():
            return "npy"
        if (path / "manifest.csv").is_file():
            return "eva"
        if list(path.glob("*.npz")):
            if path.name == "slides" and (path.parent / "slides.npz").is_file():  # embed's per-input tables
                raise TubError(f"{path} holds embed's slide tables, one per input; give their union "
                               f"{path.parent / 'slides.npz'} (one embedding per slide)")
            return "pathorob"
        if _h5_files(path):
            return "h5_folder"
    raise TubError(f"{path}: not an embeddings folder (embeddings.npy, eva manifest, {{center}}.npz, h5 feature "
                   "files), .npz or .h5")


def _h5_files(folder: Path) -> list[Path]:
    return sorted(q for q in folder.iterdir() if q.is_file() and q.suffix in (".h5", ".hdf5")
                  and not q.name.startswith("."))


def _read_npz(path: Path, metadata=None) -> LabelledFeatures:
    with load_numpy(path) as z:
        arrays = {k: z[k] for k in z.files}
    key = next((k for k in FEATURE_KEYS if k in arrays and arrays[k].ndim == 2), None)
    if key is None and _is_slide_table(arrays):
        return _slide_table(arrays)
    if key is None:
        raise TubError(f"{path} needs a 2-D array 'features' (rows x dim) and 'labels', or one embedding per "
                       f"slide as embed's slides.npz (has {list(arrays)})")
    x = arrays[key]
    n = len(x)
    lab = next((k for k in LABEL_KEYS if k in arrays), None)
    labels = _strings(path, arrays, lab, n) if lab else [""] * n
    slides = _strings(path, arrays, "slide_id", n) if "slide_id" in arrays else [str(i) for i in range(n)]
    patches = _strings(path, arrays, "patch_id", n) if "patch_id" in arrays else None
    split = split_column(path, arrays["split"].tolist()) if "split" in arrays else None
    return LabelledFeatures(np.asarray(x, np.float32), labels, slides, split, patches)


def _strings(path: Path, arrays, key: str, n: int) -> list[str]:
    values = arrays[key]
    if len(values) != n:
        raise TubError(f"{path}: '{key}' has {len(values)} entries for {n} feature rows; give one per row")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]


def _is_slide_table(arrays: dict) -> bool:
    """embed's ``slides.npz`` (and ``slides/<input>.npz``): one 1-D numeric embedding per slide, key = slide id."""
    shapes = {a.shape for a in arrays.values()}
    return bool(arrays) and len(shapes) == 1 and len(next(iter(shapes))) == 1 and all(
        np.issubdtype(a.dtype, np.number) for a in arrays.values())


def _slide_table(arrays: dict) -> LabelledFeatures:
    """One row per slide, unlabelled (``--labels`` gives the labels)."""
    slides = list(arrays)
    return LabelledFeatures(np.stack([arrays[s] for s in slides]).astype(np.float32), [""] * len(slides), slides,
                            None, None, per_slide=True)


def _read_h5(path: Path, metadata=None) -> LabelledFeatures:
    """``embed --format h5`` (features, coords, slide_id, label) or TRIDENT/CLAM features (features, coords;
    no labels, slide id = file stem). Patch ids are ``x_y`` of the coords, as embed names whole-slide tiles."""
    import h5py

    dec = lambda a: [v.decode() if isinstance(v, bytes) else str(v) for v in a]  # noqa: E731
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise TubError(f"{path} cannot be read as HDF5 ({exc})") from None
    with f:
        if "features" not in f:
            raise TubError(f"{path} has no 'features' dataset (has {list(f)}); give an 'embed --format h5' output "
                           "or a TRIDENT/CLAM features h5")
        x = f["features"][()]
        if x.ndim != 2:
            raise TubError(f"{path}: 'features' has shape {x.shape}; one row per tile, (N, D), is expected")
        n = len(x)
        columns = {}
        for key in ("label", "slide_id"):
            if key in f:
                columns[key] = dec(f[key][()])
                if len(columns[key]) != n:
                    raise TubError(f"{path}: '{key}' has {len(columns[key])} entries for {n} feature rows")
        coords = f["coords"][()] if "coords" in f else None
    # tiles from arrays without coordinates carry (-1, -1): they have no position to name them by
    located = coords is not None and coords.shape == (n, 2) and bool((coords >= 0).all())
    patches = [f"{int(a)}_{int(b)}" for a, b in coords] if located else None
    return LabelledFeatures(x.astype(np.float32), columns.get("label", [""] * n),
                            columns.get("slide_id", [path.stem] * n), None, patches)


def _read_h5_folder(path: Path, metadata=None) -> LabelledFeatures:
    """A folder of h5 feature files (TRIDENT's/CLAM's features folder): one slide per file."""
    parts = []
    for f in _h5_files(path):
        part = _read_h5(f)
        _check_finite(f, part.x)
        part.source = [os.path.abspath(f)] * len(part.x)
        parts.append(part)
    return concat(parts)


def _read_npy_folder(path: Path, metadata) -> LabelledFeatures:
    x = load_numpy(path / "embeddings.npy")
    rows = _csv(path / "manifest.csv")
    if len(rows) != len(x):
        raise TubError(f"{path}: manifest.csv has {len(rows)} rows for {len(x)} embeddings")
    labels = [r.get("label") or "" for r in rows] if metadata is None else _metadata_labels(path, rows, metadata)
    patches = [r["patch_id"] for r in rows] if rows and "patch_id" in rows[0] else None
    return LabelledFeatures(x.astype(np.float32), labels, [r.get("slide_id", "") for r in rows],
                            _csv_split(path / "manifest.csv", rows), patches)


def _read_eva(path: Path, metadata=None) -> LabelledFeatures:
    """An eva folder: its ``manifest.csv``, embeddings relative to the folder."""
    return _read_eva_manifest(path / "manifest.csv")


def _read_eva_manifest(manifest: Path, metadata=None) -> LabelledFeatures:
    """eva's manifest (origin, embeddings, target, split), embeddings relative to its folder; a row's slide
    is its slide_id (embed writes one), else its origin. An embed run's ``eva_manifest.csv`` holds integer
    targets, named by ``eva_classes.json`` beside it, and the run's one split over all inputs."""
    from tubcli.io import read_json

    rows = _csv(manifest)
    if not rows or "embeddings" not in rows[0]:
        raise TubError(f"{manifest} is not an eva manifest (origin, embeddings, target, split)")
    names = manifest.parent / "eva_classes.json"
    classes = read_json(names) if manifest.name == "eva_manifest.csv" and names.is_file() else None
    labels = [r.get("target") or "" for r in rows]
    if classes:
        labels = [classes[int(t)] if t else "" for t in labels]
    # eva may have saved GPU or bf16 tensors: load onto the CPU, widen before numpy
    x = np.stack([_eva_embedding(manifest.parent / r["embeddings"]) for r in rows])
    return LabelledFeatures(x.astype(np.float32), labels, [r.get("slide_id") or r["origin"] for r in rows],
                            _csv_split(manifest, rows))


def _eva_embedding(path: Path) -> np.ndarray:
    """One eva ``.pt`` embedding, loaded with ``weights_only`` (never a pickled object), as float32 numpy."""
    from tubcli.io import check_torch_file, torch_load_weights, weights_only_reason

    if not path.is_file():
        raise TubError(f"eva embedding {path} does not exist; the manifest's paths are relative to its folder")
    check_torch_file(path)
    try:
        tensor = torch_load_weights(path)
    except Exception as exc:
        raise TubError(f"eva embedding {path} cannot be loaded safely: {weights_only_reason(exc)}") from None
    if not hasattr(tensor, "float"):
        raise TubError(f"eva embedding {path} holds a {type(tensor).__name__}, not a tensor")
    return tensor.float().numpy()


def _read_pathorob(path: Path, metadata) -> LabelledFeatures:
    if metadata is None:
        raise TubError(f"{path} holds PathoROB {{center}}.npz files; give --metadata CSV for labels and order")
    rows = _csv(Path(metadata))
    missing = [c for c in PATHOROB_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise TubError(f"{metadata}: metadata is missing column(s) {', '.join(missing)}; a PathoROB metadata "
                       f"CSV has {', '.join(PATHOROB_COLUMNS)} (one row per embedded tile)")
    files = {}
    xs = []
    for r in rows:
        center = r["medical_center"].replace(" ", "_")
        if center not in files:
            f = path / f"{center}.npz"
            if not f.is_file():
                raise TubError(f"no features {f} for medical_center {r['medical_center']!r}")
            files[center] = load_numpy(f)
        key = f"{r['slide_id']}-{r['patch_id']}"
        if key not in files[center]:
            raise TubError(f"{path}/{center}.npz has no key {key!r}")
        xs.append(files[center][key])
    return LabelledFeatures(np.stack(xs).astype(np.float32), [r["biological_class"] for r in rows],
                            [r["slide_id"] for r in rows], _csv_split(Path(metadata), rows),
                            [r["patch_id"] for r in rows])


READERS = {"npz": _read_npz, "h5": _read_h5, "h5_folder": _read_h5_folder, "npy": _read_npy_folder,
           "eva": _read_eva, "eva_manifest": _read_eva_manifest, "pathorob": _read_pathorob}


def _metadata_labels(path: Path, rows: list[dict], metadata) -> list[str]:
    """Labels of an npy folder's rows from a PathoROB metadata CSV (biological_class), matched on slide_id and
    patch_id: a folder of flat tiles has none of its own (e.g. `tub pathorob robustify` output)."""
    if not rows or "slide_id" not in rows[0] or "patch_id" not in rows[0]:
        raise TubError(f"{path}/manifest.csv has no slide_id/patch_id columns to match --metadata on")
    meta = _csv(Path(metadata))
    if not meta or not {"slide_id", "patch_id", "biological_class"} <= set(meta[0]):
        raise TubError(f"{metadata}: --metadata needs slide_id, patch_id and biological_class columns")
    label = {(m["slide_id"], m["patch_id"]): m["biological_class"] for m in meta}
    missing = [r for r in rows if (r["slide_id"], r["patch_id"]) not in label]
    if missing:
        raise TubError(f"{metadata} has no row for {len(missing)} embedded tile(s) of {path}, e.g. slide "
                       f"{missing[0]['slide_id']} patch {missing[0]['patch_id']}")
    return [label[(r["slide_id"], r["patch_id"])] for r in rows]


def concat(parts: list[LabelledFeatures]) -> LabelledFeatures:
    if len({p.per_slide for p in parts}) > 1:  # one probe over slide means and tiles mixes two tasks
        raise TubError("the inputs mix slide embeddings (slides.npz) and tile embeddings; probe one level at a time")
    dims = {p.x.shape[1] for p in parts}
    if len(dims) != 1:
        raise TubError(f"feature inputs have different widths {sorted(dims)}; probe one encoder at a time")
    given = [p.split is not None for p in parts]
    if any(given) and not all(given):
        raise TubError("some feature inputs have a split column and others do not; give it for all or none")
    split = sum((p.split for p in parts), []) if all(given) else None

    def rows(field: str):  # a per-row column that only some parts record: "" for the others
        if all(getattr(p, field) is None for p in parts):
            return None
        return sum((getattr(p, field) or [""] * len(p.x) for p in parts), [])

    return LabelledFeatures(np.concatenate([p.x for p in parts]), sum((p.labels for p in parts), []),
                            sum((p.slide_id for p in parts), []), split, rows("patch_id"), rows("source"),
                            per_slide=parts[0].per_slide)


class LabelTable:
    """``--labels CSV``: slide_id[,patch_id],label[,split]. A row with a patch_id labels that tile, one
    without (no patch_id column, or an empty cell) the whole slide; a tile's own row wins over its
    slide's. A ``split`` column, where there is one, replaces the inputs' splits."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TubError(f"--labels {self.path} does not exist; give a CSV with columns slide_id[,patch_id],"
                           "label[,split]")
        with open(self.path, newline="", encoding="utf-8-sig") as f:  # an Excel "CSV UTF-8" byte-order mark
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
        missing = [c for c in ("slide_id", "label") if c not in columns]
        if missing:
            have = ", ".join(columns) or "none"
            raise TubError(f"--labels {self.path} has no {' or '.join(missing)} column (has {have}); give columns "
                           "slide_id[,patch_id],label[,split]")
        labelled = [(i, r) for i, r in enumerate(rows) if (r["label"] or "").strip()]
        if not labelled:
            raise TubError(f"--labels {self.path} has no row with a label")
        self.has_split = "split" in columns
        splits = [self._split(r["split"], i + 2) for i, r in labelled] if self.has_split else None
        self.tiles: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.slides: dict[str, tuple[str, str | None]] = {}
        lines: dict = {}
        for j, (i, r) in enumerate(labelled):
            patch = (r.get("patch_id") or "").strip()
            key = (r["slide_id"], patch) if patch else r["slide_id"]
            table = self.tiles if patch else self.slides
            value = (r["label"].strip(), splits[j] if splits else None)
            if key in table and table[key] != value:
                what = f"slide {key[0]!r} patch {key[1]!r}" if patch else f"slide {key!r}"
                raise TubError(f"--labels {self.path}: {what} is on lines {lines[key]} and {i + 2} with different "
                               "labels or splits; keep one row per slide (or tile)")
            table[key], lines[key] = value, i + 2

    def _split(self, value: str | None, line: int) -> str:
        """A labelled row's split, checked as an input's split column is (never silently replaced)."""
        name = SPLIT_ALIASES.get((value or "").strip().lower())
        if name is None:
            raise TubError(f"--labels {self.path}: line {line} has split {value or ''!r}; use train, val (or valid, "
                           "validation) or test in every labelled row, or drop the split column for a seeded split")
        return name

    def attach(self, path: Path, feats: LabelledFeatures) -> LabelledFeatures:
        """``feats`` with this table's labels (and splits); a row it does not label is an error naming
        how many there are and the first one."""
        patches = feats.patch_id or [""] * len(feats.x)
        found = [self.tiles.get((s, p)) if p else None for s, p in zip(feats.slide_id, patches)]
        found = [v or self.slides.get(s) for v, s in zip(found, feats.slide_id)]
        missing = [i for i, v in enumerate(found) if v is None]
        if missing:
            i = missing[0]
            if self.tiles and feats.patch_id is None and not self.slides:
                raise TubError(f"--labels {self.path} labels tiles (slide_id, patch_id), but {path} records no "
                               "patch ids; label its slides with rows whose patch_id is empty (or no patch_id column)")
            tile = f" patch {patches[i]!r}" if patches[i] else ""
            raise TubError(f"--labels {self.path} has no label for {len(missing)} of {len(found)} row(s) of {path}, "
                           f"e.g. slide {feats.slide_id[i]!r}{tile}; add them to the CSV")
        return LabelledFeatures(feats.x, [v[0] for v in found], feats.slide_id,
                                [v[1] for v in found] if self.has_split else feats.split, feats.patch_id, feats.source,
                                per_slide=feats.per_slide)


def embed_run_encoder(path: Path) -> dict | None:
    """The encoder settings of the ``tub atlas embed`` run that wrote ``path`` (its run folder, up to three
    folders up: ``encoder.json``), with the weights path made absolute from the run's cwd; None when
    ``path`` lies in no embed run (hand-made or TRIDENT/CLAM features). ``evaluate`` records it in
    probe.json so that ``explain`` can refuse a probe trained on other features (pool, architecture)."""
    from tubcli.io import read_json

    p = Path(path).resolve()
    for d in [p, *p.parents][:4]:
        if not ((d / "env.json").is_file() and (d / "encoder.json").is_file()):
            continue
        env = read_json(d / "env.json")
        if "atlas embed" not in str(env.get("command", "")):
            return None
        enc = read_json(d / "encoder.json")
        weights = enc.get("weights")
        if weights and not enc.get("random_init") and not os.path.isabs(weights):
            weights = os.path.normpath(os.path.join(env.get("cwd") or str(d), weights))
        return {"arch": enc.get("arch"), "pool": enc.get("pool"), "dim": enc.get("dim"), "weights": weights,
                "weights_sha256": enc.get("weights_sha256"), "random_init": enc.get("random_init"), "transform": enc.get("transform"), "vit": enc.get("vit"),
                "embed_run": str(d)}
    return None


def common_encoder(paths: list[Path]) -> dict | None:
    """The one encoder the embed runs behind ``paths`` used (``embed_run_encoder``), or None when none is
    known; inputs from encoders with another architecture, pooling or weights are an error, since one
    probe cannot serve both."""
    known = [(p, rec) for p in paths if (rec := embed_run_encoder(p)) is not None]
    for p, rec in known[1:]:
        first_path, first = known[0]
        for key in ("arch", "pool", "weights_sha256" if rec.get("weights_sha256") and first.get("weights_sha256")
                    else "weights", "random_init"):  # the weights by their bytes where both runs recorded them
            if rec.get(key) != first.get(key):
                raise TubError(f"{first_path} and {p} come from different encoders ({key} {first.get(key)!r} vs "
                               f"{rec.get(key)!r}); probe one encoder's features at a time")
    return known[0][1] if known else None


def _h5_tiling(path: Path) -> tuple[float | None, int | None] | None:
    """(target µm/px, tile px) that a features h5's ``coords`` attributes record (tub embed, TRIDENT, CLAM):
    ``patch_size`` and ``target_mpp``, or the level-0 mpp × ``patch_size_level0`` / ``patch_size``; None
    when it records neither."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                return None
            attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f["coords"].attrs.items()}
    except OSError:
        return None

    def number(key):
        v = attrs.get(key)
        return float(v) if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
            and np.isfinite(v) and v > 0 else None

    px, mpp = number("patch_size"), number("target_mpp")
    mpp0, size0 = number("level0_mpp") or number("mpp"), number("patch_size_level0")
    if mpp is None and mpp0 and size0 and px:
        mpp = mpp0 * size0 / px
    return None if mpp is None and px is None else (mpp, int(px) if px else None)


def _run_tiling(run_dir: Path) -> dict[Path, tuple[float | None, int | None]]:
    """Output path -> (target µm/px, tile px) of each whole slide an embed run records (``items/*.json``,
    ``slide``), for the outputs that exist."""
    import json

    found = {}
    for p in sorted((run_dir / "items").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        slide = rec.get("slide") if isinstance(rec, dict) else None
        out = (run_dir / str(rec.get("output", ""))).resolve() if isinstance(rec, dict) else None
        if isinstance(slide, dict) and out is not None and out.exists():
            found[out] = (slide.get("target_mpp"), slide.get("tile_px"))
    return found


def features_tiling(paths: list[Path], tolerance: float = 0.05) -> dict | None:
    """How the whole-slide tiles behind the embeddings at ``paths`` were cut, as the embed outputs record it:
    the ``coords`` attributes of h5 feature files (an h5, or those in a folder; tub embed, TRIDENT, CLAM),
    and the slide records of the ``tub atlas embed`` run that wrote them for what those lack and for its
    other formats (npy/eva folders, ``slides.npz``). ``evaluate`` writes it to probe.json as ``tiling``:
    ``target_mpp`` (the median over the slides; ``target_mpp_range`` [min, max] when they differ by more
    than ``tolerance``), ``tile_px`` (the most common; ``tile_px_values`` when there are several) and
    ``slides`` (how many recorded one), for ``explain`` to compare its own tiling with. None when nothing
    records a tiling (tile folders, arrays)."""
    found: dict = {}  # output file (or run record) -> (target_mpp, tile_px)
    for path in paths:
        path = Path(path)
        rec = embed_run_encoder(path)
        recorded = _run_tiling(Path(rec["embed_run"])) if rec is not None else {}
        files = [path] if path.is_file() and path.suffix in (".h5", ".hdf5") else \
            _h5_files(path) if path.is_dir() else []
        for f in files:
            attrs, run = _h5_tiling(f), recorded.get(f.resolve())
            if attrs is None and run is None:
                continue
            mpp, px = attrs or (None, None)
            found[f.resolve()] = (mpp or (run[0] if run else None), px or (run[1] if run else None))
        if not files:  # an npy/eva folder, slides.npz, an eva manifest: the slides its run records
            mine = {o: t for o, t in recorded.items() if path.is_dir() and path.resolve() in (o, *o.parents)}
            found.update(mine or recorded)
    mpps = [float(m) for m, _ in found.values() if m]
    pxs = [int(p) for _, p in found.values() if p]
    if not mpps and not pxs:
        return None
    out: dict = {"slides": len(found)}
    if mpps:
        out["target_mpp"] = round(float(np.median(mpps)), 6)
        if max(mpps) > min(mpps) * (1 + tolerance):
            out["target_mpp_range"] = [round(min(mpps), 6), round(max(mpps), 6)]
    if pxs:
        values, counts = np.unique(pxs, return_counts=True)
        out["tile_px"] = int(values[counts.argmax()])
        if len(values) > 1:
            out["tile_px_values"] = [int(v) for v in values]
    return out
