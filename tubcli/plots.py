"""Figures that several plugins draw the same way: ROC curves of a classifier's probabilities, and the
training curves of a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tubcli.io import pyplot, remove_figure, save_figure


def roc_points(positive, score) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1): the ROC curve
    (Fawcett 2006, Algorithm 1), tied scores as one step, so its trapezoid area is the AUROC with ties
    counted half (Mann-Whitney U / n_pos n_neg)."""
    positive, score = np.asarray(positive, bool), np.asarray(score, float)
    order = np.argsort(-score, kind="stable")
    positive, score = positive[order], score[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # the last row of each tied group
    tp = np.cumsum(positive)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def area(x, y) -> float:
    """Trapezoid area under the curve through (x, y)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def roc_plot(path: Path, labels, proba, classes: list[str], folds=None, title: str = "",
             unit: str = "slides") -> Path | None:
    """ROC curves: the positive class of a binary task, or one-vs-rest per class present; with ``folds``
    (one name per row) each fold's curve thin beside the pooled one. None, and no file, where no curve
    exists (one class)."""
    y, p = np.asarray(labels).astype(int), np.asarray(proba, float)
    present = np.unique(y)
    if len(present) < 2:  # a curve an earlier invocation left here is not this one's
        remove_figure(path)
        return None
    shown = [1] if p.shape[1] == 2 else list(present)
    folds = None if folds is None else np.asarray(folds)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for c in shown:
        colour = f"C{c % 10}"
        name = f"{classes[c]} vs rest" if p.shape[1] > 2 else f"{classes[1]} vs {classes[0]}"
        if folds is not None:
            for f in np.unique(folds):
                sel = folds == f
                if len(np.unique(y[sel] == c)) == 2:
                    fpr, tpr = roc_points(y[sel] == c, p[sel, c])
                    ax.plot(fpr, tpr, color=colour, lw=0.7, alpha=0.35)
        fpr, tpr = roc_points(y == c, p[:, c])
        pooled = " pooled" if folds is not None else ""
        ax.plot(fpr, tpr, color=colour, lw=2, label=f"{name}{pooled}: AUROC {area(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_aspect("equal")
    ax.set_title(title + (" (thin: each fold)" if folds is not None else "") + f"\nn = {len(y)} {unit}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=120)


def metric_rows(path: Path, x: str, group: str | None = None) -> list[dict]:
    """The rows of a ``metrics.jsonl`` that have ``x``, one per (``group``, ``x``): a resumed run logs again
    the epochs its killed predecessor logged after the last checkpoint, and the later row is the one whose
    weights went on. Sorted by ``x``; a line that does not parse (a job killed mid-write) is left out."""
    rows: dict = {}
    path = Path(path)
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get(x), (int, float)):
            rows[(row.get(group) if group else None, row[x])] = row
    return sorted(rows.values(), key=lambda r: r[x])


def training_curves(path: Path, rows: list[dict], x: str, panels: list[list[str]], group: str | None = None,
                    best=None, title: str = "") -> Path | None:
    """Training curves: one panel per list of metric names in ``panels``, a line per metric (and per value
    of ``group``, e.g. a committee member) against ``x`` (epoch or step). A panel whose values are all
    positive and span more than a decade (losses, learning rates) gets a log axis. ``best``, an ``x`` or
    ``{group value: x}``, is drawn as a dashed line: the weights the run kept. None, and no file, where no
    row has a finite value of any metric."""
    def values(rs, key):
        v = [r.get(key) for r in rs]
        return np.array([float(a) if isinstance(a, (int, float)) else math.nan for a in v])

    panels = [[k for k in keys if any(np.isfinite(values(rows, k)))] for keys in panels]
    panels = [keys for keys in panels if keys]
    if not panels:
        remove_figure(path)  # an earlier run's curves are not this one's
        return None
    groups = list(dict.fromkeys(r.get(group) for r in rows)) if group else [None]
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        shown = []
        for i, key in enumerate(keys):
            for j, g in enumerate(groups):
                rs = [r for r in rows if group is None or r.get(group) == g]
                y = values(rs, key)
                label = key if g is None else (f"{key}, {group} {g}" if len(keys) > 1 else f"{group} {g}")
                style = dict(color=f"C{(j if len(keys) == 1 else i) % 10}", lw=1.4,
                             ls="-" if len(keys) == 1 or len(groups) == 1 else ["-", "--", ":", "-."][j % 4])
                ax.plot(values(rs, x), y, marker="o" if len(rs) <= 30 else None, ms=3, label=label, **style)
                shown.append(y[np.isfinite(y)])
        finite = np.concatenate(shown)
        if finite.size and finite.min() > 0 and finite.max() > 10 * finite.min():
            ax.set_yscale("log")
        marks = sorted(set(best.values() if isinstance(best, dict) else [] if best is None else [best]))
        for j, bx in enumerate(marks):
            ax.axvline(bx, color="grey", ls="--", lw=0.9, label="weights kept" if j == 0 else None)
        ax.set_xlabel(x)
        xs = sorted({r[x] for r in rows})
        if len(xs) == 1:  # one epoch: a tick there, not -0.04 ... 0.04
            ax.set_xticks(xs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps
        ax.set_ylabel(keys[0] if len(keys) == 1 else "")
        if len(keys) > 1 or len(groups) > 1 or marks:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
