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
from pathlib import Path

import numpy as np
import torch

from tubcli.io import atomic_path

from .encoder import Encoder, uint8_to_float
from .tiles import TileSet

MANIFEST_FIELDS = ["tile_id", "origin", "label", "slide_id", "patch_id", "x", "y"]


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on accelerators (weights stay fp32); nothing on CPU fp32."""
    if dtype in (torch.bfloat16, torch.float16) and device.type in ("cuda", "mps", "cpu"):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.inference_mode()
def embed_tileset(encoder: Encoder, tiles: TileSet, batch_size: int = 32, device="cpu",
                  dtype: torch.dtype | None = None) -> np.ndarray:
    """(N, dim) float32 embeddings of every tile, in the tile set's order."""
    device = torch.device(device)
    out = []
    for start in range(0, len(tiles), batch_size):
        x = uint8_to_float(tiles.read(start, min(start + batch_size, len(tiles)))).to(device)
        with autocast_for(device, dtype):
            out.append(encoder(x).float().cpu().numpy())
    return np.concatenate(out, axis=0)


def group_split(slide_ids: list[str], seed: int, fractions=(0.7, 0.15, 0.15)) -> list[str]:
    """Seeded 70/15/15 train/val/test split by slide (spec §2.8), stable under reordering."""
    slides = sorted(set(slide_ids))
    order = sorted(slides, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n = len(order)
    n_train = max(1, round(fractions[0] * n))
    n_val = round(fractions[1] * n) if n >= 3 else 0
    split = {}
    for i, s in enumerate(order):
        split[s] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return [split[s] for s in slide_ids]


def _write_manifest(path: Path, rows: list[dict], fields: list[str]) -> None:
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
    return {"npy": outputs / name, "eva": outputs / name, "h5": outputs / f"{name}.h5",
            "pathorob": outputs / f"{name}.npz"}[fmt]


def write_embeddings(fmt: str, out: Path, emb: np.ndarray, tiles: TileSet, seed: int = 0) -> None:
    rows = tiles.rows
    if fmt == "npy":
        with atomic_dir(out) as tmp:
            np.save(tmp / "embeddings.npy", emb.astype(np.float32))
            fields = MANIFEST_FIELDS + (["medical_center"] if "medical_center" in rows[0] else [])
            _write_manifest(tmp / "manifest.csv", rows, fields)
    elif fmt == "pathorob":
        with atomic_path(out) as tmp:
            np.savez(tmp, **{f"{r['slide_id']}-{r['patch_id']}": e for r, e in zip(rows, emb)})
    elif fmt == "h5":
        import h5py

        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=emb.astype(np.float32))
                coords = f.create_dataset("coords", data=np.array([[r["x"], r["y"]] for r in rows], dtype=np.int64))
                for k, v in tiles.extra.get("coords_attrs", {}).items():  # whole slides: CLAM/TRIDENT attrs
                    coords.attrs[k] = v
                f.create_dataset("slide_id", data=np.array([r["slide_id"] for r in rows], dtype="S"))
                f.create_dataset("label", data=np.array([r["label"] for r in rows], dtype="S"))
    elif fmt == "eva":
        splits = group_split([r["slide_id"] for r in rows], seed)
        with atomic_dir(out) as tmp:
            (tmp / "embeddings").mkdir()
            man = []
            for i, (r, e, s) in enumerate(zip(rows, emb, splits)):
                rel = f"embeddings/{i:06d}.pt"
                torch.save(torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32)), tmp / rel)
                man.append({"origin": r["origin"], "embeddings": rel, "target": r["label"], "split": s})
            _write_manifest(tmp / "manifest.csv", man, ["origin", "embeddings", "target", "split"])
    else:
        raise ValueError(fmt)


def slide_embeddings(rows: list[dict], emb: np.ndarray, how: str = "mean") -> dict[str, np.ndarray]:
    """Slide embedding = mean (or max) of its tile embeddings."""
    out: dict[str, list[np.ndarray]] = {}
    for r, e in zip(rows, emb):
        out.setdefault(r["slide_id"], []).append(e)
    red = np.mean if how == "mean" else np.max
    return {k: red(np.stack(v), axis=0).astype(np.float32) for k, v in out.items()}
