"""Average performance drop (APD) of Kömen et al., arXiv 2507.17845 (2025), spec §2.3.

Linear probes are trained on splits s = 0..S-1 in which the training data correlate biological
class with medical center more and more strongly; APD is the mean relative change of test balanced
accuracy against the uncorrelated split 0:

    a_r = mean_{s=1..S-1} acc[s][r] / acc[0][r] − 1,      APD = mean_r a_r

for in-domain (ID) and out-of-domain (OOD) test sets. The slide shuffles use Python's ``random``
with the official seeds and accumulate across repetitions, as the reference does, so that results
agree with it for the same scikit-learn.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tubcli.errors import TubError

from .metadata import Metadata


@dataclass(frozen=True)
class APDProtocol:
    centers: tuple[str, ...]
    classes: tuple[str, ...]
    n_splits: int
    slides_per_cell: int
    tiles_per_slide: int
    max_train_slides: int


PROTOCOLS = {
    "camelyon": APDProtocol(("RUMC", "UMCU"), ("normal", "tumor"), 8, 17, 300, 14),
    "tcga": APDProtocol(
        ("Asterand", "Christiana Healthcare", "Roswell Park", "University of Pittsburgh"),
        ("Breast_invasive_carcinoma", "Colon_adenocarcinoma", "Lung_adenocarcinoma", "Lung_squamous_cell_carcinoma"),
        7, 12, 30, 8),
    "tolkach_esca": APDProtocol(
        ("VALSET2_WNS", "VALSET4_CHA_FULL"), ("TUMOR", "MUSC_PROP", "SH_OES", "SH_MAG", "REGR_TU", "ADVENT"),
        4, 9, 100, 6),
}
C_GRID = 10 ** np.linspace(-8, 4, 15)


def training_slides(dataset: str, split: int) -> dict[tuple[int, int], int]:
    """Training slides n_ij per (center i, class j) in split s (larger s = stronger correlation)."""
    s = split
    if dataset == "camelyon":
        return {(0, 0): 7 - s, (0, 1): 7 + s, (1, 0): 7 + s, (1, 1): 7 - s}
    if dataset == "tcga":
        out = {}
        for i in range(4):
            for j in range(4):
                if i == j:
                    out[(i, j)] = s + 2
                elif i + j == 3:
                    out[(i, j)] = 1 if s % 2 == 1 else (2 if s < 3 else 0)
                else:
                    out[(i, j)] = 2 if s < 2 else (1 if s < 5 else 0)
        return out
    if dataset == "tolkach_esca":
        out = {}
        for j in range(6):
            out[(0, j)] = 3 - s if j < 3 else 3 + s
            out[(1, j)] = 3 + s if j < 3 else 3 - s
        return out
    raise TubError(f"APD is defined for camelyon, tcga, tolkach_esca; got {dataset!r}")


def probe_balanced_accuracy(train_x, train_y, val_x, val_y, tests) -> list[float]:
    """C grid search on validation balanced accuracy (first maximum), refit, score the test sets."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    best_c, best = None, -np.inf
    for c in C_GRID:
        score = balanced_accuracy_score(val_y, LogisticRegression(C=c, random_state=0).fit(train_x, train_y).predict(val_x))
        if score > best:
            best_c, best = c, score
    final = LogisticRegression(C=best_c).fit(train_x, train_y)
    return [balanced_accuracy_score(y, final.predict(x)) for x, y in tests]


def _cells(meta: Metadata, proto: APDProtocol, dataset: str) -> list[list[list[int]]]:
    ci = {c: i for i, c in enumerate(proto.centers)}
    bj = {b: j for j, b in enumerate(proto.classes)}
    cells = [[[] for _ in proto.classes] for _ in proto.centers]
    for r in np.flatnonzero(meta.subset == "ID"):
        c, b = meta.medical_center[r], meta.biological_class[r]
        if c not in ci or b not in bj:
            raise TubError(
                f"{meta.source}: ID row {r} has center {c!r} / class {b!r}, not in the {dataset} APD protocol "
                f"({', '.join(proto.centers)} / {', '.join(proto.classes)})"
            )
        cells[ci[c]][bj[b]].append(int(r))
    need = (proto.max_train_slides + 1) * proto.tiles_per_slide
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            name = f"cell {proto.classes[j]}-{proto.centers[i]}"
            if len(cell) <= need:
                raise TubError(
                    f"{meta.source}: {name} has {len(cell)} ID tiles; the {dataset} "
                    f"protocol needs more than {need} ({proto.max_train_slides + 1} slides × {proto.tiles_per_slide}: the "
                    f"most training slides and a test slide; its cells hold {proto.slides_per_cell} slides)"
                )
            _check_slide_blocks(meta, cell, proto.tiles_per_slide, name)
    return cells


def _check_slide_blocks(meta: Metadata, cell: list[int], T: int, name: str) -> None:
    """The protocol splits slides, not tiles: it takes each run of T consecutive rows of a cell as one slide
    (the reference's data layout). Rows not in that layout would put tiles of one slide in both the
    training and the test set, and APD would reward memorising slides."""
    seen = set()
    for k in range(0, len(cell), T):
        slides = list(dict.fromkeys(meta.slide_id[r] for r in cell[k:k + T]))
        if len(slides) > 1 or slides[0] in seen:
            detail = (f"slides {slides[0]!r} and {slides[1]!r} share one block" if len(slides) > 1
                      else f"slide {slides[0]!r} fills more than one block")
            raise TubError(f"{meta.source}: {name}: {detail} of {T} consecutive rows; APD takes each slide as "
                           f"{T} consecutive rows of its cell -- sort the metadata by slide with {T} tiles per slide")
        seen.add(slides[0])


def apd_inputs(meta: Metadata, dataset: str, tolkach_splits: dict | None = None):
    """The protocol, its ID cells, the OOD rows and the class index: every check APD makes on its
    input, so that a combined evaluation can run them before computing any other metric."""
    if dataset not in PROTOCOLS:
        raise TubError(f"APD is defined for camelyon, tcga, tolkach_esca; got {dataset!r} (pass --dataset)")
    if dataset == "tolkach_esca" and tolkach_splits is None:
        raise TubError("tolkach_esca APD needs the case-split file; pass --tolkach-splits tolkach_splits.json")
    proto = PROTOCOLS[dataset]
    cells = _cells(meta, proto, dataset)
    bj = {b: j for j, b in enumerate(proto.classes)}
    ood = np.flatnonzero(meta.subset == "OOD")
    if len(ood) == 0:
        raise TubError(f"{meta.source}: no OOD rows; APD tests on the OOD centers (subset == OOD)")
    unknown = [b for b in meta.biological_class[ood] if b not in bj]
    if unknown:
        raise TubError(f"{meta.source}: OOD row with class {unknown[0]!r} not in the {dataset} protocol")
    return proto, cells, ood, bj


def apd_accuracies(X: np.ndarray, meta: Metadata, dataset: str, iterations: int = 20,
                   tolkach_splits: dict | None = None, progress=None) -> dict:
    """Raw test accuracies ``{"ID_test_accuracies", "OOD_test_accuracies"}`` (S × iterations)."""
    proto, cells, ood, bj = apd_inputs(meta, dataset, tolkach_splits)
    T = proto.tiles_per_slide
    ood_x, ood_y = X[ood], np.array([bj[b] for b in meta.biological_class[ood]])

    random.seed(1000)
    seeds = random.sample(range(0, 10000), iterations)
    id_acc = [[] for _ in range(proto.n_splits)]
    ood_acc = [[] for _ in range(proto.n_splits)]
    steps = [(r, s) for r in range(iterations) for s in range(proto.n_splits)]
    it = iter(progress(steps, total=len(steps), desc="APD probes") if progress else steps)
    for seed in seeds:
        random.seed(seed)
        if dataset == "tolkach_esca":
            draw = [random.randint(0, len(tolkach_splits["train"][c]) - 1) for c in proto.centers]
        for i, center in enumerate(proto.centers):
            if dataset == "tolkach_esca":
                test_cases = tolkach_splits["test"][center][draw[i]]
            for j in range(len(proto.classes)):
                chunks = [cells[i][j][k:k + T] for k in range(0, len(cells[i][j]), T)]
                random.shuffle(chunks)
                if dataset == "tolkach_esca":
                    # move this split's test cases to the end (the reference iterates a set here, so its
                    # order depends on PYTHONHASHSEED; we use the split file's order)
                    first = [meta.slide_id[ch[0]] for ch in chunks]
                    for case in [c for c in dict.fromkeys(test_cases) if c in set(first)]:
                        chunks.append(chunks.pop(first.index(case)))
                        first = [meta.slide_id[ch[0]] for ch in chunks]
                cells[i][j] = [r for ch in chunks for r in ch]
        for split in range(proto.n_splits):
            next(it)
            n_ij = training_slides(dataset, split)
            tr, va, te = [], [], []
            for (i, j) in sorted(n_ij):
                n = n_ij[(i, j)] * T
                tr += cells[i][j][:n]
                va += cells[i][j][n:n + int(n / proto.max_train_slides)]
            start = (proto.max_train_slides + 1) * T
            for i in range(len(proto.centers)):
                for j in range(len(proto.classes)):
                    te += cells[i][j][start:]
            lab = lambda rows: np.array([bj[meta.biological_class[r]] for r in rows])  # noqa: E731
            a_id, a_ood = probe_balanced_accuracy(X[tr], lab(tr), X[va], lab(va), [(X[te], lab(te)), (ood_x, ood_y)])
            id_acc[split].append(float(a_id))
            ood_acc[split].append(float(a_ood))
    return {"ID_test_accuracies": id_acc, "OOD_test_accuracies": ood_acc}


def performance_drops(accuracies) -> np.ndarray:
    """a_r = mean_{s>=1} acc[s][r] / acc[0][r] − 1, one value per repetition r."""
    a = np.asarray(accuracies, dtype=np.float64)
    return (a[1:] / a[0]).mean(axis=0) - 1


def dataset_summary(raw: dict) -> dict:
    return {
        "apd_id": float(np.mean(performance_drops(raw["ID_test_accuracies"]))),
        "apd_ood": float(np.mean(performance_drops(raw["OOD_test_accuracies"]))),
        "ID_test_accuracy_means": [float(np.mean(x)) for x in raw["ID_test_accuracies"]],
        "OOD_test_accuracy_means": [float(np.mean(x)) for x in raw["OOD_test_accuracies"]],
    }


def _corrected_mean_ci(per_dataset: list[np.ndarray]) -> tuple[float, float]:
    """Masson–Loftus correction a' = a − mean_d(a) + mean_all(a); mean and t-based 95% CI (df = n)."""
    from scipy import stats

    allv = np.concatenate(per_dataset)
    grand = allv.mean()
    corrected = np.concatenate([a - a.mean() + grand for a in per_dataset])
    n = len(corrected)
    sem = corrected.std(ddof=1) / np.sqrt(n)
    return float(corrected.mean()), float(stats.t.ppf(0.975, df=n) * sem)


def aggregate(raws: dict[str, dict]) -> dict:
    """``aggregated_summary.json`` over several datasets' raw accuracies."""
    apd_id, ci_id = _corrected_mean_ci([performance_drops(r["ID_test_accuracies"]) for r in raws.values()])
    apd_ood, ci_ood = _corrected_mean_ci([performance_drops(r["OOD_test_accuracies"]) for r in raws.values()])
    return {"aggregation_datasets": list(raws), "apd_id": apd_id, "ci_id": ci_id, "apd_ood": apd_ood, "ci_ood": ci_ood}


def read_raw(path: Path) -> tuple[str, dict]:
    """A ``{dataset}_raw.json`` file: (dataset name, raw accuracies)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TubError(f"{path}: cannot read raw APD results ({str(e).splitlines()[0]})") from None
    for key in ("ID_test_accuracies", "OOD_test_accuracies"):
        if key not in raw:
            raise TubError(f"{path}: missing key {key}; expected a PathoROB {{dataset}}_raw.json")
    shapes = {}
    for key in ("ID_test_accuracies", "OOD_test_accuracies"):
        try:
            shapes[key] = np.asarray(raw[key], dtype=float).shape
        except (TypeError, ValueError):  # ragged lists or text: numpy's own message is no help
            raise TubError(f"{path}: {key} is not a table of numbers (splits × iterations, equal rows)") from None
    if len(shapes["ID_test_accuracies"]) != 2 or shapes["ID_test_accuracies"][0] < 2:
        raise TubError(f"{path}: ID_test_accuracies must be splits × iterations with at least two splits")
    if shapes["OOD_test_accuracies"] != shapes["ID_test_accuracies"]:
        raise TubError(f"{path}: OOD_test_accuracies is {shapes['OOD_test_accuracies']}, ID_test_accuracies "
                       f"{shapes['ID_test_accuracies']}; both are splits × iterations of the same runs")
    name = path.name[: -len("_raw.json")] if path.name.endswith("_raw.json") else path.stem
    return name, raw
