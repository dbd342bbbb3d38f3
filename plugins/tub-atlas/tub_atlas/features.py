"""Reading embeddings + labels for probing: the layouts ``embed`` writes, and plain NPZ.

* a folder with ``embeddings.npy`` + ``manifest.csv`` (npy layout);
* a folder with eva's ``manifest.csv`` (origin, embeddings, target, split) + ``.pt`` tensors;
* a folder of PathoROB ``{center}.npz`` files + ``--metadata`` CSV (rows in metadata order);
* an ``.npz`` with ``features``/``embeddings`` and ``labels`` (optional ``slide_id``, ``split``);
* an ``embed --format h5`` file (``features``, ``label``, ``slide_id``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tubcli.errors import TubError


@dataclass
class LabelledFeatures:
    x: np.ndarray  # (N, D) float32
    labels: list[str]
    slide_id: list[str]
    split: list[str]  # "" where unknown


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_features(path: Path, metadata: Path | None = None) -> LabelledFeatures:
    path = Path(path)
    if not path.exists():
        raise TubError(f"features {path} do not exist; give the output folder of 'tub atlas embed' or an .npz")
    if path.is_file() and path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("features", "embeddings", "x") if k in z), None)
            lab = next((k for k in ("labels", "label", "y", "target") if k in z), None)
            if key is None or lab is None:
                raise TubError(f"{path} needs arrays 'features' and 'labels' (has {list(z.keys())})")
            x = z[key]
            n = len(x)
            labels = [str(v) for v in z[lab].tolist()]
            slides = [str(v) for v in z["slide_id"].tolist()] if "slide_id" in z else [str(i) for i in range(n)]
            split = [str(v) for v in z["split"].tolist()] if "split" in z else [""] * n
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
        return LabelledFeatures(x.astype(np.float32), labels, slides, [""] * len(x))
    if path.is_dir() and (path / "embeddings.npy").is_file():
        x = np.load(path / "embeddings.npy")
        rows = _csv(path / "manifest.csv")
        if len(rows) != len(x):
            raise TubError(f"{path}: manifest.csv has {len(rows)} rows for {len(x)} embeddings")
        return LabelledFeatures(x.astype(np.float32), [r.get("label", "") for r in rows],
                                [r.get("slide_id", "") for r in rows], [r.get("split", "") for r in rows])
    if path.is_dir() and (path / "manifest.csv").is_file():
        import torch

        rows = _csv(path / "manifest.csv")
        if not rows or "embeddings" not in rows[0]:
            raise TubError(f"{path}/manifest.csv is not an eva manifest (origin, embeddings, target, split)")
        x = np.stack([torch.load(path / r["embeddings"], weights_only=True).numpy() for r in rows])
        return LabelledFeatures(x.astype(np.float32), [r["target"] for r in rows],
                                [r["origin"] for r in rows], [r.get("split", "") for r in rows])
    if path.is_dir() and list(path.glob("*.npz")):
        if metadata is None:
            raise TubError(f"{path} holds PathoROB {{center}}.npz files; give --metadata CSV for labels and order")
        rows = _csv(Path(metadata))
        files = {}
        xs = []
        for r in rows:
            center = r["medical_center"].replace(" ", "_")
            if center not in files:
                f = path / f"{center}.npz"
                if not f.is_file():
                    raise TubError(f"no features {f} for medical_center {r['medical_center']!r}")
                files[center] = np.load(f)
            key = f"{r['slide_id']}-{r['patch_id']}"
            if key not in files[center]:
                raise TubError(f"{path}/{center}.npz has no key {key!r}")
            xs.append(files[center][key])
        return LabelledFeatures(np.stack(xs).astype(np.float32), [r["biological_class"] for r in rows],
                                [r["slide_id"] for r in rows], [r.get("split", "") for r in rows])
    raise TubError(f"{path}: not an embeddings folder (embeddings.npy, eva manifest, {{center}}.npz) or .npz")


def concat(parts: list[LabelledFeatures]) -> LabelledFeatures:
    dims = {p.x.shape[1] for p in parts}
    if len(dims) != 1:
        raise TubError(f"feature inputs have different widths {sorted(dims)}; probe one encoder at a time")
    return LabelledFeatures(np.concatenate([p.x for p in parts]), sum((p.labels for p in parts), []),
                            sum((p.slide_id for p in parts), []), sum((p.split for p in parts), []))
