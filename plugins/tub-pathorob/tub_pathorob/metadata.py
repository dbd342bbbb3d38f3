"""PathoROB metadata tables: the 5-column CSV, read as strings, validated at the edge.

Kömen et al., *Towards Robust Foundation Models for Digital Pathology*, arXiv 2507.17845 (2025).
Columns: ``subset, slide_id, patch_id, biological_class, medical_center`` (spec §2.1).
No pandas: a table is a dict of 1-D string arrays of equal length.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tubcli.errors import TubError

COLUMNS = ("subset", "slide_id", "patch_id", "biological_class", "medical_center")
REQUIRED = ("slide_id", "patch_id", "biological_class", "medical_center")


@dataclass
class Metadata:
    """Row-aligned string columns; ``subset`` defaults to ``"ID"`` when the CSV has none."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def subset(self) -> np.ndarray:
        return self.columns["subset"]

    @property
    def slide_id(self) -> np.ndarray:
        return self.columns["slide_id"]

    @property
    def patch_id(self) -> np.ndarray:
        return self.columns["patch_id"]

    @property
    def biological_class(self) -> np.ndarray:
        return self.columns["biological_class"]

    @property
    def medical_center(self) -> np.ndarray:
        return self.columns["medical_center"]

    @property
    def case_id(self) -> np.ndarray:
        """TCGA case id = first 12 characters of the slide id (spec §2.1)."""
        return np.array([s[:12] for s in self.slide_id], dtype=object)

    def keys(self) -> np.ndarray:
        """Feature keys of the official npz layout: ``f"{slide_id}-{patch_id}"``."""
        return np.array([f"{s}-{p}" for s, p in zip(self.slide_id, self.patch_id)], dtype=object)

    def take(self, index) -> "Metadata":
        return Metadata({k: v[index] for k, v in self.columns.items()}, self.source)

    def where(self, mask: np.ndarray) -> "Metadata":
        return self.take(np.flatnonzero(mask))

    @classmethod
    def from_columns(cls, source: str = "<memory>", **cols) -> "Metadata":
        n = {len(v) for v in cols.values()}
        if len(n) != 1:
            raise TubError(f"{source}: metadata columns have different lengths {sorted(n)}")
        cols = {k: np.asarray(v, dtype=object) for k, v in cols.items()}
        if "subset" not in cols:
            cols["subset"] = np.full(n.pop(), "ID", dtype=object)
        return cls(cols, source)

    @classmethod
    def of(cls, meta, needed=("slide_id", "biological_class", "medical_center")) -> "Metadata":
        """``meta`` as Metadata: itself, or a pandas DataFrame / dict of columns taken **by position** (a
        shuffled or filtered DataFrame keeps its old index labels), with the ``needed`` columns present
        and no empty cell: the checks ``read_metadata`` makes on a CSV, for callers from Python."""
        if isinstance(meta, cls):
            return meta
        if hasattr(meta, "columns") and hasattr(meta, "to_numpy"):  # a DataFrame
            cols = {str(c): meta[c].to_numpy() for c in meta.columns}
        elif isinstance(meta, dict):
            cols = dict(meta)
        else:
            raise TubError(f"metadata must be a Metadata, a pandas DataFrame or a dict of columns, not "
                           f"{type(meta).__name__}")
        missing = [c for c in needed if c not in cols]
        if missing:
            raise TubError(f"metadata is missing column(s) {', '.join(missing)}; PathoROB metadata has "
                           f"{', '.join(COLUMNS)}")
        out = {c: np.asarray(v, dtype=object) for c, v in cols.items()}
        for c in (c for c in (*needed, "subset") if c in out):
            empty = [i for i, x in enumerate(out[c]) if x is None or x == "" or (isinstance(x, float) and x != x)]
            if empty:
                raise TubError(f"metadata column {c} is empty (NaN/None) in row {empty[0]}; every row needs a value")
        for c in (c for c in COLUMNS if c in out):
            out[c] = np.array([str(x) for x in out[c]], dtype=object)  # read as strings, as from a CSV
        return cls.from_columns("<memory>", **out)

    def write_csv(self, path: Path) -> None:
        from tubcli.io import atomic_path

        names = [c for c in COLUMNS if c in self.columns] + [c for c in self.columns if c not in COLUMNS]
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(names)
                w.writerows(zip(*(self.columns[c] for c in names)))


def read_metadata(path: Path | str, slide_level: bool = False) -> Metadata:
    """Read a metadata CSV as strings (as the reference does with ``dtype=str``). ``slide_level``: the
    features name their own tiles (per-slide h5 files), so ``patch_id`` may be missing; the rows are then
    slides, expanded to their tiles by the feature reader."""
    path = Path(path)
    if not path.is_file():
        raise TubError(f"metadata file not found: {path}; pass --metadata with an existing CSV")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise TubError(f"{path}: metadata CSV is empty; it needs the columns {', '.join(COLUMNS)}") from None
        rows = list(reader)
    if len(header) == 1 and any(d in header[0] for d in ";\t|"):  # European Excel (;) or a TSV named .csv
        raise TubError(f"{path} is not comma-separated (its header is {header[0][:40]!r}); save it with commas")
    header = [h.strip() for h in header]
    required = [c for c in REQUIRED if c != "patch_id" or not slide_level or "patch_id" in header]
    missing = [c for c in required if c not in header]
    if missing:
        hint = (" (slide-level rows without patch_id are read only with a folder of per-slide h5 features)"
                if missing == ["patch_id"] else "")
        raise TubError(
            f"{path}: metadata is missing column(s) {', '.join(missing)}; "
            f"a PathoROB metadata CSV has {', '.join(COLUMNS)}{hint}"
        )
    kept = [(i + 2, r) for i, r in enumerate(rows) if any(x.strip() for x in r)]  # (file line, row)
    lines, rows = [line for line, _ in kept], [r for _, r in kept]
    if not rows:
        raise TubError(f"{path}: metadata CSV has a header but no rows")
    bad = [lines[i] for i, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        raise TubError(f"{path}: line {bad[0]} has a different number of fields than the header; fix the CSV")
    cols = {h: np.array([r[j] for r in rows], dtype=object) for j, h in enumerate(header)}
    for c in required:
        empty = np.flatnonzero(cols[c] == "")
        if len(empty):
            raise TubError(f"{path}: column {c} is empty on line {lines[empty[0]]}; every row needs a value")
    # one tile twice in one subset would count its vector twice (paired subsets may share tiles)
    subsets = cols.get("subset", np.full(len(rows), "", dtype=object))
    seen: dict = {}
    patches = cols.get("patch_id", [None] * len(rows))  # None: slide-level rows
    for line, key in zip(lines, zip(subsets, cols["slide_id"], patches)):
        if key in seen:
            what = "slide" if key[2] is None else "tile"
            raise TubError(f"{path}: lines {seen[key]} and {line} are the same {what} (slide_id {key[1]}"
                           f"{'' if key[2] is None else ', patch_id ' + key[2]}"
                           f"{', subset ' + key[0] if key[0] else ''}); drop the duplicate")
        seen[key] = line
    return Metadata.from_columns(str(path), **cols)


# spec §2.1: which metadata file each metric uses per dataset, by the shape of its subset column
OFFICIAL_FILES = {("ri", "camelyon"): ("camelyon", ("id",)),
                  ("ri", "tolkach_esca"): ("tolkach_esca_reduced", ("reduced",)),
                  ("ri", "tcga"): ("tcga_2x2 or tcga_4x4", ("paired", "id")),
                  ("cs", "camelyon"): ("camelyon_reduced", ("reduced",)), ("cs", "tcga"): ("tcga_4x4", ("id",)),
                  ("cs", "tolkach_esca"): ("tolkach_esca_reduced", ("reduced",))}


def subset_kind(meta: Metadata) -> str:
    """``id`` (ID/OOD subsets: the full files), ``reduced`` (``<class>-<center>``) or ``paired``
    (``b1-b2-c1-c2``, tcga_2x2)."""
    names = set(meta.subset.tolist()) - {"ID", "OOD"}
    if not names:
        return "id"
    return "paired" if all(n.count("-") >= 3 for n in names) else "reduced"


def official_file_mismatch(meta: Metadata, metric: str, dataset: str | None) -> str | None:
    """Why ``meta`` is not the file the official protocol uses for ``metric`` on ``dataset`` (None: it is,
    or the dataset is custom): a result on another file is not the paper's number."""
    want = OFFICIAL_FILES.get((metric, dataset))
    if want is None:
        return None
    file, kinds = want
    kind = subset_kind(meta)
    if kind in kinds:
        return None
    return (f"{meta.source} has {kind} subsets, but the official {metric.upper()} on {dataset} uses {file} "
            f"({' or '.join(kinds)} subsets): the result is not comparable with the paper's")


def check_evaluation_set(meta: Metadata, k: int | None = None, what: str = "robustness index") -> None:
    """Reject metadata on which a metric would be meaningless, with a one-line reason."""
    centers = np.unique(meta.medical_center)
    classes, counts = np.unique(meta.biological_class, return_counts=True)
    if len(meta) == 0:
        raise TubError(f"{meta.source}: no ID rows left for the {what}; check the subset column")
    if len(centers) < 2:
        raise TubError(
            f"{meta.source}: only one medical center ({centers[0]}) in the evaluation set; "
            f"the {what} compares centers, so give features from at least two"
        )
    if len(classes) < 2:
        raise TubError(
            f"{meta.source}: only one biological class ({classes[0]}); the {what} needs at least two classes"
        )
    overlap = set(centers) & set(classes)
    if overlap:
        raise TubError(
            f"{meta.source}: class and center names overlap ({sorted(overlap)[0]}); rename one of them"
        )
    if k is not None:
        small = [(c, n) for c, n in zip(classes, counts) if n < k]
        if small:
            c, n = small[0]
            raise TubError(
                f"{meta.source}: class {c} has {n} samples, fewer than k={k}; lower --k or drop the class"
            )
