"""Evaluation figures: Kaplan-Meier curves of the predicted high- and low-risk slides (ROC curves: ``tubcli.plots``)."""

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
