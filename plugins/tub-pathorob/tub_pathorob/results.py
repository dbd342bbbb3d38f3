"""Result files in the reference's names and layout (JSON/CSV only; never pickle).

Official tree (``--layout official``): ``robustness_index/{model}/{dataset}/{max_patches}_{k_opt_param}/``
(``results_summary.json``, ``balanced-accuracies-bio.csv``), ``apd/{model}/{dataset}_raw.json`` /
``_summary.json`` / ``aggregated_summary.json``, ``clustering_score/{model}/{dataset}/``
(``results_summary.json``, ``aris.csv``, ``silhouette_scores.csv``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from tubcli.io import write_json, write_text

RI_FILES = ("results_summary.json", "balanced-accuracies-bio.csv", "robustness_curves.json")
CS_FILES = ("results_summary.json", "aris.csv", "silhouette_scores.csv")


def _csv(rows, header) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def metric_dir(root: Path, metric: str, layout: str, model: str, dataset: str | None, leaf: str | None = None) -> Path:
    if layout != "official":
        return root
    d = root / metric / model
    if dataset:
        d = d / dataset
    return d / leaf if leaf else d


def write_ri(folder: Path, result) -> None:
    """The files ``RI_FILES`` in ``folder``."""
    summary, bal_acc, curves_file = (folder / name for name in RI_FILES)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(summary, result.summary)
    write_text(bal_acc, _csv(zip(result.k_grid.tolist(), result.bal_acc.tolist(), result.bal_acc_std.tolist()),
                             ["k", "bal_acc", "std"]))
    curves = {k: np.asarray(v).tolist() for k, v in result.curves.items()}
    write_json(curves_file, {"k": list(range(1, len(curves["robustness_index"]) + 1)), **curves})


def write_cs(folder: Path, res) -> None:
    """The files ``CS_FILES`` in ``folder``."""
    summary, aris, silhouettes = (folder / name for name in CS_FILES)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(summary, res.summary)
    write_text(aris, _csv(res.aris, ["combination", "trial", "ari_bio", "ari_mc", "clustering_score"]))
    write_text(silhouettes, _csv(res.silhouettes, ["combination", "K", "silhouette_score"]))


def read_aris(path: Path) -> list[tuple[str, float]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return [(row["combination"], float(row["clustering_score"])) for row in r]


# per-model summaries of the official tree: (glob under outputs/, the path parts that name the row)
STUDY_SOURCES = {
    "robustness_index": ("robustness_index/*/*/*/results_summary.json", ("model", "dataset", "setting")),
    "clustering_score": ("clustering_score/*/*/results_summary.json", ("model", "dataset")),
    "apd": ("apd/*/*_summary.json", ("model", "dataset")),
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cell(v) -> str:
    import json

    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return json.dumps(v)
    return repr(v) if isinstance(v, float) else str(v)


def study_rows(outputs: Path, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``metric``'s study table: one row per summary file of the official tree under
    ``outputs`` (every model, dataset and setting written there), sorted by them; unreadable files are left out."""
    import json

    pattern, id_cols = STUDY_SOURCES[metric]
    records = []
    for f in sorted(Path(outputs).glob(pattern)):
        if not f.is_file() or f.name == "aggregated_summary.json":
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        parts = f.relative_to(outputs).parts[1:]
        ids = list(parts[:len(id_cols)])
        if metric == "apd":
            ids[1] = f.name[: -len("_summary.json")]
        records.append((ids, _flat(data)))
    keys: list[str] = []
    for _, data in records:
        keys += [k for k in data if k not in keys]
    rows = [ids + [_cell(data.get(k)) for k in keys] for ids, data in records]
    return [*id_cols, *keys], rows


def write_study_table(outputs: Path, metric: str) -> tuple[Path | None, int]:
    """``outputs/study_<metric>.csv`` rebuilt from the summaries on disk (see :func:`study_rows`)."""
    header, rows = study_rows(outputs, metric)
    if not rows:
        return None, 0
    path = Path(outputs) / f"study_{metric}.csv"
    write_text(path, _csv(rows, header))
    return path, len(rows)
