"""Labelled bags from a features folder and a labels CSV (slide_id, label | target | time+event, optional split)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tubcli.errors import TubError

from tub_xmil.bags import find_bag, read_bag
from tub_xmil.splits import ACCEPTED, split_name


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


def read_labels(path: Path, task: str) -> list[tuple[int, dict]]:
    """(line number in the file, row) pairs, so that errors can point at the line."""
    if path is None or not Path(path).is_file():
        raise TubError(f"labels CSV {path} not found; pass --set labels=labels.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, r) for r in reader]
    if not rows or "slide_id" not in rows[0][1]:
        raise TubError(f"{path}: needs a header with a slide_id column")
    need = {"classification": ["label"], "regression": ["target"], "survival": ["time", "event"]}[task]
    for col in need:
        if col not in rows[0][1]:
            alt = "label" if col == "target" and "label" in rows[0][1] else None
            if alt is None:
                raise TubError(f"{path}: a {task} task needs the column(s) {', '.join(need)}")
    return rows


def class_name(value: str) -> str:
    """A label cell as a class name, so that '1', '1.0' and ' 1' are one class."""
    v = value.strip()
    try:
        f = float(v)
    except ValueError:
        return v
    return str(int(f)) if f.is_integer() else v


def sorted_classes(names) -> list[str]:
    """Sorted class names: numerically when all are integers, else as text."""
    names = set(names)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _number(path, line: int, r: dict, col: str) -> float:
    """A finite number from a CSV cell; NaN targets would train NaN weights without an error."""
    v = (r.get(col) or "").strip()
    try:
        f = float(v)
    except ValueError:
        f = float("nan")
    if not np.isfinite(f):
        raise TubError(f"{path} line {line} (slide {r['slide_id']}): {col} {v!r} is not a finite number; "
                       "fix or drop the row")
    return f


def _event(path, line: int, r: dict) -> int:
    """0 (censored) or 1 (event); other codings (R's Surv 1/2) would train a wrong loss silently."""
    e = _number(path, line, r, "event")
    if e not in (0.0, 1.0):
        raise TubError(f"{path} line {line} (slide {r['slide_id']}): event {r['event'].strip()!r} is not 0 or 1 "
                       "(1 = event/death, 0 = censored; recode R's Surv 1/2 as 0/1)")
    return int(e)


def _split(path, line: int, r: dict) -> str:
    """The row's canonical split; an unknown name is an error, not a slide silently left out."""
    name = split_name(r.get("split"))
    if name is None:
        raise TubError(f"{path} line {line} (slide {r['slide_id']}): unknown split {r['split'].strip()!r}; "
                       f"accepted (any case): {ACCEPTED}")
    return name


def _check_rows(path, rows: list[tuple[int, dict]], task: str) -> None:
    """One row per slide_id and no empty labels (a duplicate would count a slide twice, or twice differently)."""
    seen: dict[str, int] = {}
    for line, r in rows:
        sid = r["slide_id"]
        if not (sid or "").strip():
            raise TubError(f"{path} line {line}: empty slide_id")
        if sid in seen:
            raise TubError(f"{path}: slide_id {sid!r} is on lines {seen[sid]} and {line}; keep one row per slide")
        seen[sid] = line
        if task == "classification" and (r["label"] or "").strip().lower() in ("", "nan"):
            raise TubError(f"{path} line {line} (slide {sid}): missing label; fill it in or drop the row")


def load_slides(features: Path, labels: Path, task: str, split: str | None = None,
                classes: list[str] | None = None) -> tuple[list[Slide], list[str]]:
    """Slides with their bags. Classification labels become indices into ``classes``: those of a
    trained model when given (so evaluation uses the model's class order), else the sorted label
    values of the CSV, which must hold at least two."""
    if features is None or not Path(features).exists():
        raise TubError(f"features folder {features} not found; pass --set features=DIR")
    rows = read_labels(labels, task)
    _check_rows(labels, rows, task)
    if task == "classification" and classes is None:
        classes = sorted_classes(class_name(r["label"]) for _, r in rows)
        if len(classes) < 2:
            raise TubError(f"{labels}: classification needs at least 2 classes, the labels are all "
                           f"{classes[0]!r}; use --task regression or add slides of another class")
    splits = {line: _split(labels, line, r) for line, r in rows}
    if split is not None:
        wanted = split_name(split)
        rows = [(line, r) for line, r in rows if splits[line] == wanted]
    slides = []
    for line, r in rows:
        sid, label, time, event = r["slide_id"], 0.0, float("nan"), 1
        if task == "classification":
            name = class_name(r["label"])
            if name not in classes:
                raise TubError(f"{labels} line {line} (slide {sid}): label {name!r} is not a class of the "
                               f"model ({', '.join(classes)})")
            label = float(classes.index(name))
        elif task == "regression":
            label = _number(labels, line, r, "target" if "target" in r else "label")
        else:
            time, event = _number(labels, line, r, "time"), _event(labels, line, r)
        p = find_bag(features, sid)
        if p is None:
            raise TubError(f"no bag for slide {sid} in {features} (.h5, .pt or .npz)")
        x, coords, _ = read_bag(p)
        slides.append(Slide(sid, x, coords, label, time, event, split=splits[line]))
    if not slides:
        raise TubError(f"{labels}: no slides{' in split ' + split if split else ''}")
    return slides, classes or []
