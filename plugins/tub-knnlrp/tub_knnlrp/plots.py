"""Figures: relevance heatmaps for pixel features and feature-flipping curves (matplotlib, Agg)."""

from __future__ import annotations

import numpy as np

from tubcli.io import pyplot, save_figure


def relevance_heatmaps(path, data, values, side: int, titles=None) -> None:
    """Input image (grey) above its relevance (red = for the explained class, blue = against)."""
    plt = pyplot()
    n = len(values)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.3 * max(n, 1), 2.8), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(data[i].reshape(side, side), cmap="gray_r")
        lim = float(np.abs(values[i]).max()) or 1.0
        axes[1, i].imshow(values[i].reshape(side, side), cmap="bwr", vmin=-lim, vmax=lim)
        if titles is not None:
            axes[0, i].set_title(str(titles[i]), fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def flipping_curves_plot(path, rows) -> None:
    """rows: [replacement, method, aupc, aupc_normalised, seconds, *curve] as written to flipping.csv."""
    plt = pyplot()
    repls = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(repls), figsize=(5 * len(repls), 3.6), squeeze=False)
    for ax, repl in zip(axes[0], repls):
        for r in rows:
            if r[0] != repl:
                continue
            curve = np.asarray(r[5:], dtype=float)
            ax.plot(np.linspace(0, 1, len(curve)), curve, label=f"{r[1]} ({r[2]:.3f})",
                    lw=2.2 if r[1] == "lrp" else 1.0)
        ax.set_xlabel("fraction of features flipped")
        ax.set_ylabel("score of the explained class")
        ax.set_title(f"feature flipping ({repl})")
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
