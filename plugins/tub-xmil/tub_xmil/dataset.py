"""Labelled bags from a features folder and a labels CSV (slide_id, label | target | time+event, optional split)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from tubcli.errors import TubError

from tub_xmil.bags import find_bag, read_bag
from tub_xmil.splits import ACCEPTED, split_name


class Slide:
    """A labelled slide and its bag of patch features.

    ``load_slides`` gives lazy slides: they keep the bag's ``path`` and its (patches, dim) ``shape``
    and read the features from disk each time ``features`` is asked for (one bag per training step,
    as CLAM/TRIDENT do), so a cohort costs about one bag of memory, not all of them. A slide made with
    a ``features`` tensor (the demo, tests) holds it, as before."""

    def __init__(self, slide_id: str, features: torch.Tensor | None = None, coords: np.ndarray | None = None,
                 label: float = 0.0, time: float = float("nan"), event: int = 1, split: str = "train",
                 extra: dict | None = None, *, path: str | Path | None = None,
                 shape: tuple[int, int] | None = None):
        if features is None and path is None:
            raise ValueError("a Slide needs its features or the path of its bag")
        self.slide_id, self.label, self.time, self.event, self.split = slide_id, label, time, event, split
        self.extra = {} if extra is None else extra
        self._features, self._coords = features, coords
        self.path = None if path is None else Path(path)
        self._shape = None if shape is None else tuple(int(n) for n in shape)

    @property
    def lazy(self) -> bool:
        """True when the features are read from ``path`` on each use, not held."""
        return self._features is None

    @property
    def features(self) -> torch.Tensor:
        """(patches, dim) float32: the held tensor, or the bag read from disk now (not kept)."""
        return self._features if self._features is not None else self.load()[0]

    @features.setter
    def features(self, value: torch.Tensor) -> None:
        self._features = value
        self._shape = None if value is None else tuple(value.shape)

    @property
    def coords(self) -> np.ndarray | None:
        if self._features is not None or self._coords is not None:
            return self._coords
        return self.load()[1]

    @coords.setter
    def coords(self, value: np.ndarray | None) -> None:
        self._coords = value

    @property
    def shape(self) -> tuple[int, int]:
        """(patches, dim) without reading the bag when it was recorded at load time."""
        return self._shape if self._shape is not None else tuple(self.features.shape)

    def load(self) -> tuple[torch.Tensor, np.ndarray | None]:
        """(features, coords) of the bag, read from disk (checked by ``read_bag``: NaN/inf, empty)."""
        if self._features is not None:
            return self._features, self._coords
        x, coords, _ = read_bag(self.path)
        if self._shape is not None and tuple(x.shape) != self._shape:
            raise TubError(f"{self.path.name}: the bag changed while running: features are now {tuple(x.shape)}, "
                           f"they were {self._shape} when the slides were loaded")
        return x, coords

    def __repr__(self) -> str:
        where = f"path={str(self.path)!r}" if self.lazy else "features=<held>"
        return (f"Slide(slide_id={self.slide_id!r}, {where}, shape={self._shape}, label={self.label!r}, "
                f"time={self.time!r}, event={self.event!r}, split={self.split!r})")


def read_labels(path: Path, task: str) -> list[tuple[int, dict]]:
    """(line number in the file, row) pairs, so that errors can point at the line."""
    if path is None:
        raise TubError("no labels CSV given; pass --labels labels.csv (slide_id + label|target|time,event)")
    if not Path(path).is_file():
        raise TubError(f"labels CSV {path} not found; pass --labels with an existing CSV file")
    with open(path, newline="", encoding="utf-8-sig") as f:  # an Excel "CSV UTF-8" byte-order mark
        reader = csv.DictReader(f)
        reader.fieldnames = _column_names(path, reader.fieldnames or [])
        rows = [(reader.line_num, r) for r in reader]
    if not rows and "slide_id" in (reader.fieldnames or []):
        raise TubError(f"{path} has a header but no rows; add one row per slide (slide_id, label|target|time,event)")
    names = reader.fieldnames or []
    if len(names) == 1 and any(d in names[0] for d in ";\t|"):  # European Excel (;) or a TSV named .csv
        raise TubError(f"{path} is not comma-separated (its header is {names[0][:40]!r}); save it with commas")
    if not rows or "slide_id" not in rows[0][1]:
        raise TubError(f"{path}: needs a header with a slide_id column")
    for _, r in rows:  # " sl000 " names the bag sl000, as label cells are read without their spaces
        r["slide_id"] = (r.get("slide_id") or "").strip()
    need = {"classification": ["label"], "regression": ["target"], "survival": ["time", "event"]}[task]
    for col in need:
        if col not in rows[0][1]:
            alt = "label" if col == "target" and "label" in rows[0][1] else None
            if alt is None:
                raise TubError(f"{path}: a {task} task needs the column(s) {', '.join(need)}")
    return rows


LABEL_COLUMNS = ("slide_id", "label", "target", "time", "event", "split")


def _column_names(path, header: list[str]) -> list[str]:
    """The header with the columns tub reads matched without regard to case or spaces (Slide_ID)."""
    names = []
    for h in header:
        key = (h or "").strip().lower()
        names.append(key if key in LABEL_COLUMNS + CASE_COLUMNS else h)  # Patient_ID too: patients stay together
    twice = next((n for n in LABEL_COLUMNS + CASE_COLUMNS if names.count(n) > 1), None)
    if twice:
        raise TubError(f"{path}: two columns read as {twice!r} ({', '.join(h for h, n in zip(header, names) if n == twice)}); "
                       "keep one")
    return names


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
        return sorted(names, key=lambda name: (int(name), name))  # text breaks ties, not the hash order
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


# a labels column naming the patient/case of each slide (TCGA, xMIL's case metadata): the validation split
# that train makes keeps one patient's slides together
CASE_COLUMNS = ("case_id", "patient_id", "patient")


def load_slides(features: Path, labels: Path, task: str, split: str | None = None,
                classes: list[str] | None = None,
                input_dim: int | None = None) -> tuple[list[Slide], list[str]]:
    """Lazy slides (see ``Slide``) with every check done here, before any training step or output:
    labels, splits, one row per slide, a bag per slide, and each bag read once (read, check, drop:
    about one bag of memory) for NaN/inf features, empty bags and one feature dimension for all slides
    (``input_dim``: a model's). Classification labels become indices into ``classes``: those of a
    trained model when given (so evaluation uses the model's class order), else the sorted label
    values of the CSV, which must hold at least two."""
    if features is None:
        raise TubError("no features folder given; pass --features DIR (bags named by slide_id)")
    if not Path(features).exists():
        raise TubError(f"features folder {features} not found; pass --features with an existing folder")
    if not Path(features).is_dir():
        raise TubError(f"--features {features} is a file; pass the folder of bags (one per slide_id)")
    rows = read_labels(labels, task)
    _check_rows(labels, rows, task)
    if task == "classification" and classes is None:
        classes = sorted_classes(class_name(r["label"]) for _, r in rows)
        if len(classes) < 2:
            raise TubError(f"{labels}: classification needs at least 2 classes, the labels are all "
                           f"{classes[0]!r}; use --task regression or add slides of another class")
        folded: dict[str, list[str]] = {}
        for c in classes:
            folded.setdefault(c.casefold(), []).append(c)
        if alike := [names for names in folded.values() if len(names) > 1]:  # 'pos' and 'Pos': a typo, or two?
            import logging

            logging.getLogger("tub").warning("%s: the labels %s differ only in case and are separate classes; write "
                                             "them alike if they are one", labels,
                                             "; ".join(" and ".join(map(repr, names)) for names in alike))
    splits = {line: _split(labels, line, r) for line, r in rows}
    if split is not None:
        wanted = split_name(split)
        rows = [(line, r) for line, r in rows if splits[line] == wanted]
    bags = {r["slide_id"]: find_bag(features, r["slide_id"]) for _, r in rows}
    missing = [sid for sid, p in bags.items() if p is None]
    if missing:  # all of them at once: tile/features skip bad slides, so several may lack a bag
        shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
        raise TubError(f"no bag in {features} (.h5, .pt or .npz) for {len(missing)} slide(s) of {labels}: {shown}; "
                       "drop their rows (or give a labels CSV of the slides that have features)")
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
        p = bags[sid]
        x, _, _ = read_bag(p)  # raises on NaN/inf, empty or non-(patches, dim) features
        shape = tuple(x.shape)
        del x  # keep only the path: the bag is read again when a step needs it
        if input_dim is not None and shape[1] != input_dim:
            raise TubError(f"{p.name}: features are {shape[1]}-d, the model expects {input_dim}-d")
        if slides and shape[1] != slides[0].shape[1]:
            raise TubError(f"{p.name}: features are {shape[1]}-d, those of slide {slides[0].slide_id} are "
                           f"{slides[0].shape[1]}-d; all bags must come from one encoder")
        case = next((str(r[c]).strip() for c in CASE_COLUMNS if str(r.get(c) or "").strip()), None)
        slides.append(Slide(sid, None, None, label, time, event, split=splits[line], path=p, shape=shape,
                            extra={"case_id": case} if case else None))
    if not slides:
        raise TubError(f"{labels}: no slides{' in split ' + split if split else ''}")
    _warn_patient_gaps(labels, slides)
    return slides, classes or []


def _warn_patient_gaps(labels, slides) -> None:
    """A patient whose slides the labels put in two splits (train and test) leaks between them: the model
    is tested on a patient it was trained on, and the test metrics come out too good. A slide without a
    patient beside slides with one is a patient of its own (an empty cell, or a typo)."""
    import logging

    log = logging.getLogger("tub")
    splits: dict[str, set] = {}
    for s in slides:
        if s.extra and s.extra.get("case_id"):
            splits.setdefault(s.extra["case_id"], set()).add(s.split)
    alone = [s.slide_id for s in slides if not (s.extra and s.extra.get("case_id"))]
    if splits and alone:  # an empty patient cell: that slide is a patient of its own in splits and intervals
        log.warning("%s: %d slide(s) have no patient (e.g. %s) while the others do; each counts as a patient of its "
                    "own in splits and bootstrap intervals", labels, len(alone), alone[0])
    if leaking := sorted(c for c, sp in splits.items() if len(sp) > 1):
        log.warning("%s: %d patient(s) have slides in more than one split (e.g. %s: %s); their slides leak between "
                    "the splits: give each patient one split", labels, len(leaking), leaking[0],
                    ", ".join(sorted(splits[leaking[0]])))
