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


def write_ri(folder: Path, result, k_opt_param: int, max_patches: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results_summary.json", result.summary)
    write_text(folder / "balanced-accuracies-bio.csv",
               _csv(zip(result.k_grid.tolist(), result.bal_acc.tolist(), result.bal_acc_std.tolist()), ["k", "bal_acc", "std"]))
    curves = {k: np.asarray(v).tolist() for k, v in result.curves.items()}
    write_json(folder / "robustness_curves.json", {"k": list(range(1, len(curves["robustness_index"]) + 1)), **curves})


def write_cs(folder: Path, res) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results_summary.json", res.summary)
    write_text(folder / "aris.csv", _csv(res.aris, ["combination", "trial", "ari_bio", "ari_mc", "clustering_score"]))
    write_text(folder / "silhouette_scores.csv", _csv(res.silhouettes, ["combination", "K", "silhouette_score"]))


def read_aris(path: Path) -> list[tuple[str, float]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return [(row["combination"], float(row["clustering_score"])) for row in r]
