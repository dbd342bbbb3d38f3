"""Figures that several plugins draw the same way: ROC curves of a classifier's probabilities."""

from __future__ import annotations

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
