"""Reading embeddings + labels for probing: the layouts ``embed`` writes, and plain NPZ.

* a folder with ``embeddings.npy`` + ``manifest.csv`` (npy layout);
* a folder with eva's ``manifest.csv`` (origin, embeddings, target, split) + ``.pt`` tensors;
* a folder of PathoROB ``{center}.npz`` files + ``--metadata`` CSV (rows in metadata order);
* an ``.npz`` with ``features``/``embeddings`` and ``labels`` (optional ``slide_id``, ``split``);
* an ``embed --format h5`` file (``features``, ``label``, ``slide_id``).

Every input is checked here, so that a bad one is a one-line error naming the file: features must be
finite (a NaN row silently turns the linear probe into NaN weights and skews kNN), and a ``split``
column, where there is one, must name a known split in every row (``SPLIT_ALIASES``; it is never
ignored in favour of a random split).
"""

from __future__ import annotations

import csv
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
    labels: list[str]
    slide_id: list[str]
    split: list[str] | None  # train/val/test per row; None when the input has no split column


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


def read_features(path: Path, metadata: Path | None = None) -> LabelledFeatures:
    feats = _read_features(Path(path), metadata)
    _check_finite(path, feats.x)
    return feats


def _read_features(path: Path, metadata: Path | None) -> LabelledFeatures:
    if not path.exists():
        raise TubError(f"features {path} do not exist; give the output folder of 'tub atlas embed' or an .npz")
    if path.is_file() and path.suffix == ".npz":
        with load_numpy(path) as z:
            key = next((k for k in ("features", "embeddings", "x") if k in z), None)
            lab = next((k for k in ("labels", "label", "y", "target") if k in z), None)
            if key is None or lab is None:
                raise TubError(f"{path} needs arrays 'features' and 'labels' (has {list(z.keys())})")
            x = z[key]
            n = len(x)
            labels = [str(v) for v in z[lab].tolist()]
            slides = [str(v) for v in z["slide_id"].tolist()] if "slide_id" in z else [str(i) for i in range(n)]
            split = split_column(path, z["split"].tolist()) if "split" in z else None
        return LabelledFeatures(np.asarray(x, np.float32), labels, slides, split)
    if path.is_file() and path.suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            if "features" not in f or "label" not in f:
                raise TubError(f"{path} needs datasets 'features' and 'label' (an 'embed --format h5' output)")
            x = f["features"][()]
            dec = lambda a: [v.decode() if isinstance(v, bytes) else str(v) for v in a]  # noqa: E731
            labels = dec(f["label"][()])
            slides = dec(f["slide_id"][()]) if "slide_id" in f else [path.stem] * len(x)
        return LabelledFeatures(x.astype(np.float32), labels, slides, None)
    if path.is_dir() and (path / "embeddings.npy").is_file():
        x = load_numpy(path / "embeddings.npy")
        rows = _csv(path / "manifest.csv")
        if len(rows) != len(x):
            raise TubError(f"{path}: manifest.csv has {len(rows)} rows for {len(x)} embeddings")
        labels = [r.get("label", "") for r in rows] if metadata is None else _metadata_labels(path, rows, metadata)
        return LabelledFeatures(x.astype(np.float32), labels,
                                [r.get("slide_id", "") for r in rows], _csv_split(path / "manifest.csv", rows))
    if path.is_dir() and (path / "manifest.csv").is_file():
        import torch

        rows = _csv(path / "manifest.csv")
        if not rows or "embeddings" not in rows[0]:
            raise TubError(f"{path}/manifest.csv is not an eva manifest (origin, embeddings, target, split)")
        # eva may have saved GPU or bf16 tensors: load onto the CPU, widen before numpy
        x = np.stack([torch.load(path / r["embeddings"], map_location="cpu", weights_only=True).float().numpy()
                      for r in rows])
        return LabelledFeatures(x.astype(np.float32), [r["target"] for r in rows],
                                [r["origin"] for r in rows], _csv_split(path / "manifest.csv", rows))
    if path.is_dir() and list(path.glob("*.npz")):
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
                                [r["slide_id"] for r in rows], _csv_split(Path(metadata), rows))
    raise TubError(f"{path}: not an embeddings folder (embeddings.npy, eva manifest, {{center}}.npz) or .npz")


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
    dims = {p.x.shape[1] for p in parts}
    if len(dims) != 1:
        raise TubError(f"feature inputs have different widths {sorted(dims)}; probe one encoder at a time")
    given = [p.split is not None for p in parts]
    if any(given) and not all(given):
        raise TubError("some feature inputs have a split column and others do not; give it for all or none")
    split = sum((p.split for p in parts), []) if all(given) else None
    return LabelledFeatures(np.concatenate([p.x for p in parts]), sum((p.labels for p in parts), []),
                            sum((p.slide_id for p in parts), []), split)
