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
