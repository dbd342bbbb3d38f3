"""Tile embedding and the output layouts users' tools read (spec §2.7).

* ``npy``: ``<name>/embeddings.npy`` (N, D) float32 + ``manifest.csv`` row-aligned;
* ``pathorob``: ``{center}.npz`` per ``medical_center``, key ``f"{slide_id}-{patch_id}"`` (the official
  PathoROB feature layout, read by ``tub pathorob ri`` and the official scripts);
* ``h5``: ``<name>.h5`` with ``features`` (N, D) and ``coords`` (N, 2) level-0 pixels (CLAM/TRIDENT; for
  whole slides ``coords`` carries their attributes: patch_size, patch_level, target magnification, …);
* ``eva``: ``<name>/embeddings/<i>.pt`` + ``manifest.csv`` (origin, embeddings, target, split).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tubcli.device import autocast
from tubcli.errors import TubError
from tubcli.io import atomic_path, write_json
from tubcli.runs import ItemLock, unreadable_output

from .encoder import Encoder, uint8_to_float
from .tiles import TileSet, too_long

MANIFEST_FIELDS = ["tile_id", "origin", "label", "slide_id", "patch_id", "x", "y"]


@torch.inference_mode()
def embed_tileset(encoder: Encoder, tiles: TileSet, batch_size: int = 32, device="cpu",
                  dtype: torch.dtype | None = None) -> np.ndarray:
    """(N, dim) float32 embeddings of every tile, in the tile set's order. A NaN or inf embedding (fp16
    overflow, weights at the edge of the range) is an error naming its tile: checked once per batch, on
    the device, so the input fails (failures.jsonl) instead of writing values no probe can use."""
    from tubcli.prefetch import read_ahead

    device = torch.device(device)
    out = []
    starts = range(0, len(tiles), batch_size)
    for start, batch in read_ahead(lambda s: tiles.read(s, min(s + batch_size, len(tiles))), starts):
        encoder.check_tile_size(*batch.shape[1:3], tiles.rows[start]["origin"])
        x = uint8_to_float(batch, device)
        with autocast(device, dtype):
            emb = encoder(x).float()
        finite = torch.isfinite(emb).all(dim=1)
        if not bool(finite.all()):
            raise TubError(non_finite_message(tiles, start, finite, dtype))
        out.append(emb.cpu().numpy())
    return np.concatenate(out, axis=0)


def non_finite_message(tiles: TileSet, start: int, finite: torch.Tensor, dtype=None) -> str:
    """The error for NaN/inf embeddings of a batch starting at row ``start`` (``finite``: per tile)."""
    bad = torch.nonzero(~finite.cpu()).flatten().tolist()
    row = tiles.rows[start + bad[0]]
    which = row["origin"] if row.get("origin") else f"{tiles.name} tile {start + bad[0]}"
    more = f" (and of {len(bad) - 1} more tiles of its batch)" if len(bad) > 1 else ""
    why = "fp16 overflows in this model: use --precision bf16 or fp32" if dtype == torch.float16 else \
        "the weights are finite, so its activations overflowed: check the weights (or try --precision fp64)"
    return f"{which}: its embedding{more} is NaN or inf, nothing was written for this input; {why}"


def group_split(slide_ids: list[str], seed: int, fractions=(0.7, 0.15, 0.15), labels=None) -> list[str]:
    """Seeded 70/15/15 train/val/test split by slide (spec §2.8), stable under reordering.

    With ``labels`` (one per row) the slides are split within each class (a slide's class: its most
    common label), as scikit-learn's StratifiedGroupKFold does, so that every class with two or
    more slides has test rows: one class left out of the test split would make balanced accuracy
    the recall of the others alone."""
    slides = sorted(set(slide_ids))
    strata: dict = {None: slides}
    if labels is not None:
        counts: dict = {}
        for s, lab in zip(slide_ids, labels):
            counts.setdefault(s, {}).setdefault(lab, 0)
            counts[s][lab] += 1
        strata = {}
        for s in slides:  # ties broken by the label's text, so the result does not depend on row order
            strata.setdefault(max(sorted(counts[s]), key=counts[s].get), []).append(s)
    split = {}
    for members in strata.values():
        order = sorted(members, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
        n = len(order)
        n_train = max(1, round(fractions[0] * n))
        n_val = round(fractions[1] * n) if n >= 3 else 0
        if labels is not None and n >= 2 and fractions[2] > 0 and n_train + n_val >= n:
            n_train, n_val = (n_train, n_val - 1) if n_val > 1 or n_train == 1 else (n_train - 1, n_val)
        for i, s in enumerate(order):
            split[s] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    if labels is not None and fractions[2] > 0 and "test" not in split.values():
        return group_split(slide_ids, seed, fractions)  # one slide per class: nothing to stratify
    return [split[s] for s in slide_ids]


def write_manifest(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """A temporary folder beside ``path``, moved into place when the block succeeds."""
    with atomic_path(path, suffix="") as tmp:
        os.unlink(tmp)
        tmp.mkdir()
        yield tmp


def output_path(fmt: str, outputs: Path, name: str) -> Path:
    """Where the output of the input (or center) ``name`` goes: always directly inside ``outputs``."""
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise TubError(f"{name!r} cannot name an output file inside {outputs}; rename that input or center")
    out = {"npy": outputs / name, "eva": outputs / name, "h5": outputs / f"{name}.h5",
           "pathorob": outputs / f"{name}.npz"}[fmt]
    if too_long(name):
        raise TubError(f"{name[:32]!r}... is too long to name output files ({too_long(name)}); "
                       "rename that input or center")
    return out


def encoder_attrs(section, info: dict, precision: str, seed: int) -> dict:
    """What an .h5 output records of its encoder, for tub-xmil (which reads ``encoder`` as xmil's own
    features record it). ``encoder`` is the name of the ``tub_patch_encoders`` loader that gives the same
    features, or, where none does (another pooling, normalisation or tile size), a description no loader
    has: ``xmil heatmap`` then cannot re-embed slides with the wrong features (a mean-pooled bag explained
    with CLS features) and says to heatmap the feature files instead."""
    from .plugin import ENCODERS, FROM_WEIGHTS

    changed = [f"{k} {getattr(section, k)}" for k in ("pool", "norm", "img_size", "heads")
               if getattr(section, k) is not None]
    if info["random_init"] and seed != 0:  # the loader's random weights are those of seed 0
        changed.append(f"random weights of seed {seed}")
    if changed:
        name = f"tub atlas {info['arch']} ({', '.join(changed)})"
    elif info["arch"] in ENCODERS:
        name = info["arch"]
    elif section.arch == "auto" and section.weights is not None:  # what the loader reads beside the weights too
        name = FROM_WEIGHTS
    else:
        name = f"tub atlas {info['arch']}"
    attrs = {"encoder": name,
             "encoder_pool": info["pool"], "encoder_tile_size": int(info["transform"]["img_size"]),
             "precision": precision}
    if info.get("weights_sha256"):
        attrs["encoder_weights_sha256"] = info["weights_sha256"]
    return attrs


def write_embeddings(fmt: str, out: Path, emb: np.ndarray, tiles: TileSet, seed: int = 0,
                     attrs: dict | None = None) -> None:
    """``attrs``: the encoder's record (:func:`encoder_attrs`), kept by the .h5 format."""
    rows = tiles.rows
    if fmt == "npy":
        with atomic_dir(out) as tmp:
            np.save(tmp / "embeddings.npy", emb.astype(np.float32))
            fields = MANIFEST_FIELDS + (["medical_center"] if "medical_center" in rows[0] else [])
            absolute = [{**r, "origin": absolute_origin(r["origin"])} for r in rows]
            write_manifest(tmp / "manifest.csv", absolute, fields)
    elif fmt == "pathorob":
        with atomic_path(out) as tmp:
            np.savez(tmp, **{f"{r['slide_id']}-{r['patch_id']}": e for r, e in zip(rows, emb)})
    elif fmt == "h5":
        import h5py

        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["origin"] = absolute_origin(rows[0]["origin"])  # checked before a rerun skips this output
                f.attrs.update(attrs or {})
                f.create_dataset("features", data=emb.astype(np.float32))
                coords = f.create_dataset("coords", data=np.array([[r["x"], r["y"]] for r in rows], dtype=np.int64))
                for k, v in tiles.extra.get("coords_attrs", {}).items():  # whole slides: CLAM/TRIDENT attrs
                    coords.attrs[k] = v
                text = h5py.string_dtype("utf-8")  # numpy's "S" is ASCII: a slide named Fall-ü failed to write
                f.create_dataset("slide_id", data=[r["slide_id"] for r in rows], dtype=text)
                f.create_dataset("label", data=[r["label"] for r in rows], dtype=text)
    elif fmt == "eva":
        labels = [r["label"] for r in rows]
        splits = group_split([r["slide_id"] for r in rows], seed, labels=labels if all(labels) else None)
        with atomic_dir(out) as tmp:
            (tmp / "embeddings").mkdir()
            man = []
            for i, (r, e, s) in enumerate(zip(rows, emb, splits)):
                rel = f"embeddings/{i:06d}.pt"
                torch.save(torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32)), tmp / rel)
                man.append({"origin": absolute_origin(r["origin"]), "embeddings": rel, "target": r["label"],
                            "split": s, "slide_id": r["slide_id"]})
            write_manifest(tmp / "manifest.csv", man, ["origin", "embeddings", "target", "split", "slide_id"])
    else:
        raise ValueError(fmt)


_ORIGIN = re.compile(r"^(?P<file>.+?)(?::\d+|@-?\d+,-?\d+)?$")  # "<array>:<i>", "<slide>@<x>,<y>" or a file


def absolute_origin(origin: str) -> str:
    """``origin`` with its file part made absolute (``os.path.abspath``: symlinks kept as spelt), so a
    rerun from another folder compares it with the right input."""
    m = _ORIGIN.match(origin)
    return os.path.abspath(m["file"]) + origin[m.end("file"):]


def recorded_origin(fmt: str, out: Path) -> str | None:
    """The origin of the first tile of an existing ``npy``/``eva``/``h5`` output (its manifest's
    ``origin`` column, the h5 ``origin`` attribute); None for an h5 written before tub recorded it."""
    if fmt == "h5":
        import h5py

        try:
            with h5py.File(out, "r") as f:
                origin = f.attrs.get("origin")
        except OSError as exc:
            raise unreadable_output(out, exc) from None
        return None if origin is None else (origin.decode() if isinstance(origin, bytes) else str(origin))
    try:
        with open(out / "manifest.csv", newline="") as f:
            row = next(csv.DictReader(f), None)
    except OSError:
        row = None
    if row is None or not row.get("origin"):
        raise TubError(f"{out} exists but its manifest.csv records no origin; pass --overwrite to replace it")
    return row["origin"]


def same_source(origin: str, source: Path) -> bool:
    """Whether a tile's recorded ``origin`` lies in the input ``source`` (that file, or inside that
    folder). Outputs record absolute origins; a relative one (older tub) is taken from the current folder."""
    tile_file, src = Path(_ORIGIN.match(origin)["file"]), Path(source)
    for norm in (lambda q: Path(os.path.abspath(q)), Path.resolve):  # as spelt (symlinked tiles), then real
        f, s = norm(tile_file), norm(src)
        if f == s or (src.is_dir() and s in f.parents):
            return True
    return False


def _redo(out: Path, why: str) -> TubError:
    return TubError(f"{out} {why}; give this input a new -o, or pass --overwrite to replace it")


def _check_unrecorded_h5(out: Path, source: Path) -> None:
    """An h5 of an older tub (no ``origin``): its ``slide_id``, ``label``, ``coords`` and tile count must be
    this input's (a folder or tile array, whose names are read without decoding tiles)."""
    import h5py

    from .tiles import ARRAY_EXT, read_array_file, read_folder

    src = Path(source)
    if not (src.is_dir() or src.suffix.lower() in ARRAY_EXT):
        raise _redo(out, f"records no origin (written by an older tub) and cannot be checked against {src} "
                         "without tiling it")
    rows = (read_folder(src) if src.is_dir() else read_array_file(src)).rows
    try:
        with h5py.File(out, "r") as f:
            n = len(f["features"])
            have = [(a.decode(), b.decode(), int(x), int(y))
                    for a, b, (x, y) in zip(f["slide_id"][()], f["label"][()], f["coords"][()])]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise _redo(out, f"records no origin and its tiles cannot be read ({exc})") from None
    want = [(r["slide_id"], r["label"], r["x"], r["y"]) for r in rows]
    if n != len(rows) or have != want:
        first = next((h for h, w in zip(have, want) if h != w), None)
        diff = f"first differing tile of slide {first[0]!r}" if first else f"{n} tiles, {len(rows)} here"
        raise _redo(out, f"records no origin (written by an older tub) and holds other tiles than {src} ({diff})")


def check_existing_output(fmt: str, out: Path, source: Path | TileSet) -> None:
    """An existing output is skipped only if it came from this input: a skip would otherwise let another
    input's embeddings (``tiles/`` for ``tiles.npz``, another metadata CSV's center) stand in for it.
    ``source`` is the input path, or for ``pathorob`` the center's tiles (their keys must be the file's)."""
    if not out.exists():
        return
    if fmt == "pathorob":
        import zipfile

        want = {f"{r['slide_id']}-{r['patch_id']}" for r in source.rows}
        try:
            with zipfile.ZipFile(out) as z:
                have = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
        except (OSError, zipfile.BadZipFile) as exc:
            raise unreadable_output(out, exc) from None
        if have != want:
            other = sorted(have - want) or sorted(want - have)
            center = source.rows[0].get("medical_center", source.name) if source.rows else source.name
            raise TubError(f"{out} holds other tiles than center {center!r} of this metadata (e.g. "
                           f"{other[0]!r}); give a new -o for this metadata, or pass --overwrite to replace it")
        return
    origin = recorded_origin(fmt, out)
    if origin is None:
        _check_unrecorded_h5(out, source)
        return
    tile_file = _ORIGIN.match(origin)["file"]
    if not os.path.isabs(tile_file):  # older tub: relative to a folder this run cannot know
        if not (same_source(origin, source) and os.path.exists(tile_file)):
            raise _redo(out, f"records the relative origin {tile_file} (written by an older tub from an unknown "
                             f"folder), which is not in {source} from the current folder")
        return
    if not same_source(origin, source):
        raise _redo(out, f"holds the embeddings of another input (first tile {tile_file}), not of "
                         f"{os.path.abspath(source)}")


class SlideTables:
    """Slide embeddings of a run folder: one table per input (``slides/<input>.npz``, written with its
    output) and their union ``slides.npz``, rebuilt at the end of every invocation from the tables of
    all inputs whose output is present, so that it covers earlier invocations and other shards too.
    A slide may come from one input only: its embedding pools that input's tiles."""

    def __init__(self, run_dir: Path, has_output: Callable[[str], bool]):
        self.folder = run_dir / "slides"
        self.path = run_dir / "slides.npz"
        self.has_output = has_output
        self.tables = self._read()

    def _read(self) -> dict[str, dict[str, np.ndarray]]:
        tables = {}
        for f in sorted(self.folder.glob("*.npz")):
            if self.has_output(f.stem):
                with np.load(f) as z:
                    tables[f.stem] = {k: z[k] for k in z.files}
        return tables

    def add(self, name: str, slides: dict[str, np.ndarray]) -> None:
        """Record one input's slides (before its output is written); a slide that another input already
        holds is an error."""
        _union({**self.tables, name: slides})
        with atomic_path(self.folder / f"{name}.npz") as tmp:
            np.savez(tmp, **slides)
        self.tables[name] = slides

    def write(self) -> int:
        """Rebuild ``slides.npz``; returns its number of slides. Under a lock, so that when shards finish
        together the last one to write has read every table."""
        with ItemLock(self.path).waiting():
            merged = _union(self._read())
            if merged:
                with atomic_path(self.path) as tmp:
                    np.savez(tmp, **merged)
        return len(merged)


def write_eva_manifest(run_dir: Path, folders: list[Path], seed: int) -> tuple[int | None, str | None]:
    """The manifest eva reads (``eva_manifest.csv``, root = the run folder): every labelled row of the run's
    eva outputs with the target as an integer, the index of its class in ``eva_classes.json`` (eva's
    loader takes int64 targets), and one seeded 70/15/15 split by slide, stratified by class, over all
    inputs (the per-input manifests split each input alone: a one-slide input is all train). Rebuilt
    under a lock at the end of every invocation, like ``slides.npz``; returns (rows, None), or (None, why)
    when it cannot be made (a row without a label, which eva's classification tasks need; an output of an
    older tub without slide ids, whose tiles would each count as a slide and leak across the split), and
    then no earlier manifest is left behind to be taken for this run's."""
    from .probing import sorted_classes

    path = run_dir / "eva_manifest.csv"
    with ItemLock(path).waiting():
        rows = []
        for folder in folders:
            with open(folder / "manifest.csv", newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({**r, "embeddings": os.path.relpath(folder / r["embeddings"], run_dir)})
        why = ("some eva outputs come from an older tub without slide ids; embed them again with --overwrite"
               if any(not r.get("slide_id") for r in rows) else
               "some tiles have no label (eva's classification tasks need one)" if not all(r["target"] for r in rows)
               else None)
        if why is not None or not rows:
            for stale in (path, run_dir / "eva_classes.json"):
                stale.unlink(missing_ok=True)
            return None, why
        classes = sorted_classes([r["target"] for r in rows])
        index = {c: i for i, c in enumerate(classes)}
        splits = group_split([r["slide_id"] for r in rows], seed, labels=[r["target"] for r in rows])
        union = [{**r, "target": index[r["target"]], "split": s} for r, s in zip(rows, splits)]
        write_json(run_dir / "eva_classes.json", classes)
        with atomic_path(path) as tmp:
            write_manifest(tmp, union, ["origin", "embeddings", "target", "split", "slide_id"])
    return len(union), None


def _union(tables: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    merged, source = {}, {}
    for name, slides in tables.items():
        for sid, e in slides.items():
            if sid in source:
                raise TubError(f"slide {sid!r} is in two inputs, {source[sid]!r} and {name!r}; a slide's tiles "
                               "must come from one input: embed them in separate runs (-o)")
            merged[sid], source[sid] = e, name
    return merged


def slide_embeddings(rows: list[dict], emb: np.ndarray, how: str = "mean") -> dict[str, np.ndarray]:
    """Slide embedding = mean (or max) of its tile embeddings."""
    out: dict[str, list[np.ndarray]] = {}
    for r, e in zip(rows, emb):
        out.setdefault(r["slide_id"], []).append(e)
    red = np.mean if how == "mean" else np.max
    return {k: red(np.stack(v), axis=0).astype(np.float32) for k, v in out.items()}
