"""Labelled bags from a features folder and a labels CSV (slide_id, label | target | time+event, [split])."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tubcli.errors import TubError

from tub_xmil.bags import find_bag, read_bag


@dataclass
class Slide:
    slide_id: str
    features: torch.Tensor
    coords: np.ndarray | None
    label: float
    time: float = float("nan")
    event: int = 1
    split: str = "train"
    extra: dict = field(default_factory=dict)


def read_labels(path: Path, task: str) -> list[dict]:
    if path is None or not Path(path).is_file():
        raise TubError(f"labels CSV {path} not found; pass --set labels=labels.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "slide_id" not in rows[0]:
        raise TubError(f"{path}: needs a header with a slide_id column")
    need = {"classification": ["label"], "regression": ["target"], "survival": ["time", "event"]}[task]
    for col in need:
        if col not in rows[0]:
            alt = "label" if col == "target" and "label" in rows[0] else None
            if alt is None:
                raise TubError(f"{path}: a {task} task needs the column(s) {', '.join(need)}")
    return rows


def load_slides(features: Path, labels: Path, task: str, split: str | None = None) -> tuple[list[Slide], list]:
    """Slides with their bags; classes are sorted label values (ints if all numeric)."""
    if features is None or not Path(features).exists():
        raise TubError(f"features folder {features} not found; pass --set features=DIR")
    rows = read_labels(labels, task)
    if split is not None and "split" in rows[0]:
        rows = [r for r in rows if r["split"] == split]
    classes: list = []
    if task == "classification":
        vals = [r["label"] for r in rows]
        try:
            classes = sorted({int(v) for v in vals})
        except ValueError:
            classes = sorted(set(vals))
    slides = []
    for r in rows:
        p = find_bag(features, r["slide_id"])
        if p is None:
            raise TubError(f"no bag for slide {r['slide_id']} in {features} (.h5, .pt or .npz)")
        x, coords, _ = read_bag(p)
        s = Slide(r["slide_id"], x, coords, 0.0, split=r.get("split", "train") or "train")
        if task == "classification":
            s.label = float(r["label"]) if isinstance(classes[0], int) else float(classes.index(r["label"]))
        elif task == "regression":
            s.label = float(r.get("target", r.get("label")))
        else:
            s.time, s.event = float(r["time"]), int(float(r["event"]))
        slides.append(s)
    if not slides:
        raise TubError(f"{labels}: no slides{' in split ' + split if split else ''}")
    return slides, classes
