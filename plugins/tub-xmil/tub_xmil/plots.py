"""Evaluation figures: Kaplan-Meier curves of the predicted high- and low-risk slides, and the mean patch-flipping
curves of each explanation method (ROC curves: ``tubcli.plots``)."""

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


def flipping_plot(path: Path, records: list[dict], methods: list[str], task: str, strategy: str) -> Path:
    """Mean MoRF (solid) and LeRF (dashed) curves over the slides of :func:`tub_xmil.flipping.slide_flipping`,
    one colour per method, a panel per approach (drop: patches removed from the full bag; add: put into an
    empty one), each slide's curve on the fraction of its patches flipped (0..1) so slides of any size average.
    A faithful map drops f fast under MoRF and slowly under LeRF: the gap between the two is its SRG."""
    grid = np.linspace(0.0, 1.0, 101)
    approaches = [a for a in ("drop", "add") if a in records[0][methods[0]]]
    what = {"classification": "p(target class)", "regression": "predicted value", "survival": "predicted risk"}[task]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(approaches), figsize=(5.2 * len(approaches), 4), squeeze=False)
    for ax, a in zip(axes[0], approaches):
        for i, m in enumerate(methods):
            mean = {}
            for order in ("morf", "lerf"):
                curves = [np.asarray(r[m][a][order], float) for r in records]
                mean[order] = np.mean([np.interp(grid, np.linspace(0, 1, len(c)), c) for c in curves], axis=0)
            aupc = np.mean([r[m][a]["aupc_morf"] for r in records])
            srg = np.mean([r[m][a]["srg"] for r in records])
            ax.plot(grid, mean["morf"], color=f"C{i % 10}", lw=1.6, label=f"{m}: AUPC-MoRF {aupc:.3f}, SRG {srg:.3f}")
            ax.plot(grid, mean["lerf"], color=f"C{i % 10}", lw=1.2, ls="--")
        ax.set_xlabel(f"patches {'removed' if a == 'drop' else 'added'}: share of the {strategy} steps (tied scores "
                      "merge blocks)")
        ax.set_ylabel(f"model output: {what}")
        ax.set_title(f"{a}: solid most relevant first (MoRF), dashed least (LeRF)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    kept = "correctly predicted slide(s), p(target) > 0.5" if task == "classification" else "slide(s)"
    fig.suptitle(f"patch flipping, mean over {len(records)} {kept}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
