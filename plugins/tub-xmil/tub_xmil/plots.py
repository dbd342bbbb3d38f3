"""Evaluation figures: ROC curves of classifiers, Kaplan-Meier curves of the predicted high- and low-risk slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.io import pyplot, save_figure

from tub_xmil.metrics import kaplan_meier


def risk_group_plot(path: Path, times, events, high, groups: dict, c_index: float, note: str = "") -> Path:
    """Kaplan-Meier step curves of the two risk groups with censoring ticks, group sizes and events in the
    legend, and the log-rank p and C-index in the title (``groups``: :func:`tub_xmil.metrics.risk_groups`)."""
    plt = pyplot()
    t, e, high = np.asarray(times, float), np.asarray(events, bool), np.asarray(high, bool)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, members, colour in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not members.any():
            continue
        at, s = kaplan_meier(t[members], e[members])
        xs, ys = np.concatenate([[0.0], at]), np.concatenate([[1.0], s])
        end = t[members].max()
        ax.step(np.append(xs, end), np.append(ys, ys[-1]), where="post", color=colour,
                label=f"{name} (n={members.sum()}, {e[members].sum()} events)")
        cens = t[members & ~e]  # a censored slide marked on its group's curve
        if len(cens):
            ax.plot(cens, ys[np.searchsorted(xs, cens, side="right") - 1], "|", color=colour, ms=8)
    p = groups.get("logrank_p")
    p_text = "n/a" if p is None or not np.isfinite(p) else f"{p:.2g}"
    ax.set_title(f"split at the median predicted risk{note}\nlog-rank p = {p_text}, C-index = {c_index:.3f}",
                 fontsize=9)
    ax.set_xlabel("time (units of the labels' time column)")
    ax.set_ylabel("survival probability (Kaplan-Meier)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    return save_figure(fig, path, dpi=120)


def roc_plot(path: Path, labels, proba, classes: list[str], folds=None, title: str = "") -> Path | None:
    """ROC curves: the positive class of a binary task, or one-vs-rest per class present; with ``folds``
    (one name per slide) each fold's curve thin beside the pooled one. None where no curve exists (one class)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = np.asarray(labels).astype(int), np.asarray(proba, float)
    present = np.unique(y)
    if len(present) < 2:
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
                    fpr, tpr, _ = roc_curve(y[sel] == c, p[sel, c])
                    ax.plot(fpr, tpr, color=colour, lw=0.7, alpha=0.35)
        fpr, tpr, _ = roc_curve(y == c, p[:, c])
        pooled = " pooled" if folds is not None else ""
        ax.plot(fpr, tpr, color=colour, lw=2, label=f"{name}{pooled}: AUROC {roc_auc_score(y == c, p[:, c]):.3f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_aspect("equal")
    ax.set_title(title + (" (thin: each fold)" if folds is not None else "") + f"\nn = {len(y)} slides", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=120)
