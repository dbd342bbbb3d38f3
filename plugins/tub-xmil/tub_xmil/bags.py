"""Reading feature bags: tub/TRIDENT/CLAM ``.h5`` (``features`` + ``coords``), CLAM/xMIL ``.pt``
tensors (N, D) in ascending patch_id order, ``.npz`` (``features``[, ``coords``] or patch_id ->
vector), and xMIL directories of per-patch ``{idx}.pt`` files. torch is imported where a tensor is made:
tiling lists folders with this module and needs no torch (2-4 s to import)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.io import load_numpy, torch_load_weights, weights_only_reason

BAG_SUFFIXES = (".h5", ".pt", ".npz")


def read_bag(path: str | Path) -> tuple[torch.Tensor, np.ndarray | None, dict]:
    """(features (N, D) float32, level-0 coords (N, 2) or None, attributes).

    Checked at load time: a NaN/inf feature would otherwise turn every score, prediction and
    GeoJSON value of the slide into NaN, and an array of tiles is not a bag of features."""
    import torch

    path = Path(path)
    feats, coords, attrs = _read(path)
    if feats.dim() == 2 and len(feats) == 0:
        raise TubError(f"{path.name}: the bag has no patches (a slide without tissue tiles); leave that slide out "
                       "or tile it again with a lower tissue threshold")
    if feats.dim() != 2:
        raise TubError(f"{path.name}: features have shape {tuple(feats.shape)}, expected (patches, dim); "
                       "give a features file (tub xmil features), not tiles")
    bad = int((~torch.isfinite(feats)).any(1).sum())
    if bad:
        raise TubError(f"{path.name}: {bad} of {len(feats)} patches have NaN or infinite features; "
                       "re-extract the features of this slide")
    if coords is not None and len(coords) != len(feats):  # scores would land on the wrong tiles
        raise TubError(f"{path.name}: {len(feats)} feature rows but {len(coords)} coords; each patch needs "
                       "one of each: re-extract the features of this slide")
    return feats, coords, attrs


def _read(path: Path) -> tuple[torch.Tensor, np.ndarray | None, dict]:
    import torch

    if path.is_dir():
        files = sorted(path.glob("*.pt"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
        if not files:
            raise TubError(f"{path}: folder has no per-patch .pt files")
        if not is_patch_folder(path):
            raise TubError(f"{path}: the .pt files hold (patches, dim) bags, one per slide, not one vector per "
                           "patch; give the files (or the folder) as bags")
        return _stack_patch_vectors(files), None, {}
    if not path.is_file():
        raise TubError(f"{path}: no such feature file")
    suffix = path.suffix.lower()
    if suffix == ".h5":
        import h5py
        from tub_xmil.tiling import _py, int_coords, with_level0_size
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise TubError(f"{path.name}: no 'features' dataset; expected a CLAM/TRIDENT/tub features .h5")
                feats = np.asarray(f["features"][:], np.float32)
                coords = int_coords(f["coords"][:]) if "coords" in f else None
                attrs = {k: _py(v) for k, v in f.attrs.items()}
                if "coords" in f:
                    attrs.update({k: _py(v) for k, v in f["coords"].attrs.items()})
        except OSError as exc:
            raise TubError(f"{path.name}: not a readable HDF5 file ({str(exc)[:80]})") from None
        if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM writes (1, N, D)
            feats = feats[0]
        return torch.from_numpy(feats), coords, with_level0_size(attrs)
    if suffix == ".pt":
        t, pt_coords = _load_tensor(path, with_coords=True)
        if t.dim() == 3 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 2:
            raise TubError(f"{path.name}: expected a (N, D) tensor, got shape {tuple(t.shape)}")
        coords, attrs = xmil_metadata(path, len(t))
        if pt_coords is not None:
            from tub_xmil.tiling import int_coords
            coords = int_coords(pt_coords.numpy())
        return t.float(), coords, attrs
    if suffix == ".npz":
        z = load_numpy(path)
        if "features" in z:
            from tub_xmil.tiling import int_coords
            coords = int_coords(z["coords"]) if "coords" in z else None
            attrs = ({"patch_size_level0": int(np.rint(float(z["patch_size_level0"])))}
                     if "patch_size_level0" in z else {})
            return torch.from_numpy(z["features"].astype(np.float32)), coords, attrs
        if not z.files or not all(k.isdigit() for k in z.files):
            raise TubError(f"{path.name}: no 'features' array and the keys ({', '.join(z.files[:4])}) are not "
                           "patch ids; give a features .npz (features[, coords]), not tiles")
        vecs = [z[k].reshape(-1) for k in sorted(z.files, key=int)]
        if len({len(v) for v in vecs}) > 1:
            raise TubError(f"{path.name}: the per-patch vectors differ in length; expected one feature "
                           "vector per patch")
        return torch.from_numpy(np.stack(vecs).astype(np.float32)), None, {}
    raise TubError(f"{path.name}: unknown feature format; use .h5, .pt or .npz")


def is_patch_folder(folder: Path) -> bool:
    """True for an xMIL folder of per-patch ``{idx}.pt`` files (one bag), False for a folder of
    per-slide bags (CLAM ``pt_files/1001.pt``: numeric slide ids are common).

    Numeric names alone cannot tell the two apart; the contents can, but only all of them: a
    one-patch slide (1, D) may sort first among (N, D) slides. So every file's shape is read
    (memory-mapped, no data): any file with more than one row means per-slide bags; all 1-D means
    per-patch vectors; all single rows (1, D) are per-patch only under xMIL's 0..N-1 patch names."""
    files = [q for q in folder.glob("*.pt") if q.is_file()]
    if not files or not all(q.stem.isdigit() for q in files):
        return False
    shapes = [tuple(_load_tensor(q, mmap=True).shape) for q in files]
    if any(len(s) >= 2 and s[-2] > 1 for s in shapes):
        return False
    if all(len(s) <= 1 for s in shapes):
        return True
    return sorted(int(q.stem) for q in files) == list(range(len(files)))


def _stack_patch_vectors(files: list[Path]) -> torch.Tensor:
    """(N, D) from per-patch files, each 1-D or (1, D) of one length D; checked before stacking so
    that an odd file is named instead of surfacing as torch.stack's RuntimeError."""
    import torch

    vecs, dim = [], None
    for q in files:
        t = _load_tensor(q)
        if t.dim() > 2 or (t.dim() == 2 and t.shape[0] != 1) or t.dim() == 0:
            raise TubError(f"{q.name}: holds a tensor of shape {tuple(t.shape)} in a folder of per-patch "
                           "vectors (1-D or (1, D)); keep one feature vector per file")
        t = t.reshape(-1)
        if dim is None:
            dim = len(t)
        elif len(t) != dim:
            raise TubError(f"{q.name}: a {len(t)}-d vector, but {files[0].name} is {dim}-d; every per-patch "
                           "file needs the same feature dimension")
        vecs.append(t)
    return torch.stack(vecs).float()


def xmil_metadata(bag: Path, n: int) -> tuple[np.ndarray | None, dict]:
    """Level-0 coords of an xMIL bag ``<root>/features/{slide}.pt`` from
    ``<root>/patches/{slide}/metadata/df.csv`` (``patch_id``, ``position_abs "(x,y)"``,
    ``patch_size_abs``), in ascending patch_id order; (None, {}) when there is no such file."""
    import csv
    import re

    meta = bag.parent.parent / "patches" / bag.stem / "metadata" / "df.csv"
    if not meta.is_file():
        return None, {}
    with open(meta, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(float(r["patch_id"])))
    if len(rows) != n:
        raise TubError(f"{meta}: {len(rows)} patches but the bag {bag.name} has {n}")
    from tub_xmil.tiling import int_coords

    coords = int_coords([[float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", r["position_abs"])[:2]]
                         for r in rows])
    attrs = ({"patch_size_level0": int(np.rint(float(rows[0]["patch_size_abs"])))}
             if "patch_size_abs" in rows[0] else {})
    return coords, attrs


def _load_tensor(path: Path, mmap: bool = False, with_coords: bool = False):
    import torch

    try:
        import zipfile
        mmap = mmap and zipfile.is_zipfile(path)  # legacy (non-zip) torch files cannot be memory-mapped
        t = torch_load_weights(path, mmap=mmap)
    except Exception as exc:  # noqa: BLE001
        raise TubError(f"{path.name}: cannot read as a tensor file ({weights_only_reason(exc)})") from None
    coords = None
    if isinstance(t, dict):
        tensors = {k: v for k, v in t.items() if isinstance(v, torch.Tensor)}
        if "features" not in tensors and len(tensors) > 1:  # which one? the first may be the coords
            raise TubError(f"{path.name}: a dict without 'features' (keys: {', '.join(map(str, tensors))}); "
                           "save the (N, D) feature matrix under 'features'")
        coords = tensors.get("coords")
        t = tensors.get("features", next(iter(tensors.values()), None))
    if not isinstance(t, torch.Tensor):
        raise TubError(f"{path.name}: holds no tensor")
    return (t, coords) if with_coords else t


PROVENANCE_KEYS = ("encoder", "target_mpp", "patch_size", "min_tissue", "min_std", "encoder_weights_sha256",
                   "precision")


def features_provenance(paths) -> tuple[dict, dict[str, list]]:
    """How the bags were made (encoder, tile µm/px and size, tissue filter, precision), where every .h5 bag records
    the same (``heatmap`` tiles and embeds slides the same way for the model trained on them), and the keys in
    which they differ (e.g. some embedded in bf16, some in fp32), with the values."""
    values = provenance_values(paths)
    agreed = {k: next(iter(v)) for k, v in values.items() if len(v) == 1 and None not in v}
    mixed = {k: sorted(v, key=str) for k, v in values.items() if len(v) > 1 and None not in v}
    return agreed, mixed


def provenance_values(paths) -> dict[str, set]:
    """Per provenance key the set of values the .h5 bags record (None where a bag records none); empty where a
    bag is not an .h5 file (held in memory, .pt/.npz: nothing recorded)."""
    seen: dict = {}
    for p in paths:
        if p is None or Path(p).suffix.lower() != ".h5":
            return {}
        attrs = h5_attributes(p)
        if "target_mpp" not in attrs:  # CLAM's patch_size is at its patch_level, not at a µm/px
            attrs = {k: v for k, v in attrs.items() if k in ("encoder", "encoder_weights_sha256", "precision")}
        for k in PROVENANCE_KEYS:
            v = attrs.get(k)
            seen.setdefault(k, set()).add(v if isinstance(v, (str, int, float)) else None)
    return seen


def h5_attributes(path) -> dict:
    """An .h5 bag's attributes, of the file and of its ``coords`` (how tub, CLAM and TRIDENT record them)."""
    import h5py

    from tub_xmil.tiling import _py

    with h5py.File(path, "r") as f:
        attrs = {k: _py(v) for k, v in f.attrs.items()}
        if "coords" in f:
            attrs.update({k: _py(v) for k, v in f["coords"].attrs.items()})
    return attrs


def find_bag(folder: str | Path, slide_id: str) -> Path | None:
    """The bag of ``slide_id`` in ``folder`` (or its CLAM/TRIDENT subfolders); never one outside it."""
    folder = Path(folder)
    if Path(slide_id).is_absolute() or ".." in Path(slide_id).parts:
        raise TubError(f"slide_id {slide_id!r} points outside the features folder {folder}; slide ids name bags "
                       "inside it (fix the labels CSV)")
    for sub in ("", "features", "h5_files", "pt_files"):
        for suf in (*BAG_SUFFIXES, *(s.upper() for s in BAG_SUFFIXES)):
            p = folder / sub / f"{slide_id}{suf}"
            if p.exists():
                return p
    p = folder / slide_id
    return p if p.is_dir() else None


def write_features_h5(path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for k, v in attrs.items():
            f.attrs[k] = v
            c.attrs[k] = v
