"""Plots for ``explain``: neighbour-composition bars, RI(k) curve, center-pair heatmap and a 2-D
projection coloured by class and by center (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.io import pyplot, save_figure

COLORS = {"SS": "#4c72b0", "SO": "#55a868", "OS": "#c44e52", "OO": "#8c8c8c"}
CATEGORY_LABELS = {
    "SO": "SO: same class, other center",
    "OS": "OS: other class, same center",
    "SS": "SS: same class, same center",
    "OO": "OO: other class, other center",
}
STACK = ("SO", "OS", "SS", "OO")
"""Stacking order, bottom to top: the two shares that define RI = SO / (SO + OS) at the bottom."""


def composition_figure(bd: dict):
    """The figure of :func:`composition_bars` (not saved, not closed): top row the stacked SO/OS/SS/OO
    shares of the first k neighbours by query class and by query center, bottom row SO and OS alone
    (the shares that define RI), legend outside the axes."""
    plt = pyplot()
    groups = [("class", bd["per_class"]), ("center", bd["per_center"])]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.2), sharey="row", gridspec_kw={"height_ratios": [3, 2]})
    for col, (title, table) in enumerate(groups):
        ax, ax2 = axes[0, col], axes[1, col]
        names = list(table)
        x = np.arange(len(names))
        bottom = np.zeros(len(names))
        for cat in STACK:
            vals = np.array([table[n][cat] for n in names], dtype=float)
            ax.bar(x, vals, bottom=bottom, color=COLORS[cat], label=CATEGORY_LABELS[cat])
            bottom += vals
        for i, n in enumerate(names):
            ax.text(i, 1.01, f"RI {table[n]['robustness_index']:.2f}", ha="center", fontsize=8)
        ax.set_title(f"first {bd['k']} neighbours by query {title}")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1.1)
        w = 0.38
        for off, cat in ((-w / 2, "SO"), (w / 2, "OS")):
            vals = np.array([table[n][cat] for n in names], dtype=float)
            ax2.bar(x + off, vals, width=w, color=COLORS[cat], label=CATEGORY_LABELS[cat])
        ax2.set_xticks(x, names, rotation=30, ha="right")
        ax2.set_title(f"SO and OS only (RI = SO / (SO + OS)), by query {title}", fontsize=9)
    axes[0, 0].set_ylabel("fraction of neighbours")
    axes[1, 0].set_ylabel("fraction of neighbours")
    top = max([max(t[n]["SO"], t[n]["OS"]) for _, t in groups for n in t] + [0.0])
    axes[1, 0].set_ylim(0, 1.15 * top if top > 0 else 1.0)
    # legend in stack order (top of the stack first), outside the axes on the right
    handles, labels = axes[0, 1].get_legend_handles_labels()
    axes[0, 1].legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0.0, fontsize=8, title="neighbour vs query", title_fontsize=8)
    fig.text(0.01, 0.005, "S/O: same/other biological class (first letter) × same/other medical center "
             "(second letter) of a neighbour relative to its query; RI = SO / (SO + OS).", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def composition_bars(bd: dict, path: Path) -> Path:
    return save_figure(composition_figure(bd), path, dpi=110)


def ri_curve_figure(curves: dict, k: int, k_max: int = 200, k_name: str = "k_opt"):
    """The figure of :func:`ri_curve` (not saved, not closed); ``k_name``: "k_opt" for the dataset's optimal k,
    "k" for one the user chose."""
    plt = pyplot()
    ri = np.asarray(curves["robustness_index"][:k_max], dtype=float)
    ks = np.arange(1, len(ri) + 1)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(ks, ri, color="k", label="robustness index (SO / (SO + OS))")
    ax.plot(ks, curves["ID_performance"][:k_max], color=COLORS["SS"], label="ID performance (SS / (SS + OS))")
    ax.plot(ks, curves["OOD_performance"][:k_max], color=COLORS["SO"], label="OOD performance (SO / (SO + OO))")
    label = f"{k_name} = {k}"
    if 1 <= k <= len(ri):
        label += f" (RI {ri[k - 1]:.3f})"
    ax.axvline(k, ls="--", color="grey", label=label)
    ax.annotate(f"{k_name} = {k}", xy=(k, 0.02), xytext=(4, 0), textcoords="offset points", fontsize=8,
                color="dimgrey")
    ax.set_xlabel("k (number of nearest neighbours)")
    ax.set_ylabel("robustness index / kNN performance")
    ax.set_title(f"robustness index and kNN performance vs k (k = 1 … {len(ri)})", fontsize=10)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def ri_curve(curves: dict, k: int, path: Path, k_max: int = 200, k_name: str = "k_opt") -> Path:
    return save_figure(ri_curve_figure(curves, k, k_max, k_name), path, dpi=110)


def pair_heatmap(bd: dict, path: Path) -> Path:
    plt = pyplot()
    comp = bd["same_class_neighbour_composition"]
    M = np.array(comp["matrix"])
    names = comp["centers"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1 + 0.6 * len(names)))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("neighbour center")
    ax.set_ylabel("query center")
    ax.set_title("same-class neighbours by center")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path, dpi=110)


def projection_figure(X: np.ndarray, classes: np.ndarray, centers: np.ndarray, seed: int = 0,
                      max_points: int = 5000):
    """The figure of :func:`projection` (not saved, not closed)."""
    from sklearn.decomposition import PCA

    plt = pyplot()
    n = len(X)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)[:max_points]
    Xn = X[idx] / np.linalg.norm(X[idx], axis=1, keepdims=True)
    pca = PCA(n_components=2, random_state=seed)
    Z = pca.fit_transform(Xn)
    ev = 100 * pca.explained_variance_ratio_
    shown = f"{len(idx)} of {n} tiles shown (random subsample)" if len(idx) < n else f"all {n} tiles shown"
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    classes, centers = np.asarray(classes), np.asarray(centers)
    # two palettes (no class shares a colour with a center, which reads as a class-center link), and the points
    # drawn in the subsample's random order, not group by group (the last group would cover the others)
    panels = ((axes[0], classes[idx], "biological class", plt.cm.tab10, 10),
              (axes[1], centers[idx], "medical center", plt.cm.Dark2, 8))
    for ax, labels, title, palette, size in panels:
        names = sorted(set(labels))
        colour = {name: palette(i % size) for i, name in enumerate(names)}
        ax.scatter(Z[:, 0], Z[:, 1], s=4, alpha=0.6, c=[colour[v] for v in labels])
        handles = [Line2D([], [], ls="", marker="o", ms=4, color=colour[name], label=name) for name in names]
        ax.set_title(f"colour = {title}")
        ax.set_xlabel(f"PC1 ({ev[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({ev[1]:.1f}% of variance)")
        ax.legend(handles=handles, fontsize=7, title=title, title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(f"PCA of the L2-normalised features; {shown}", fontsize=10)
    fig.tight_layout()
    return fig


def projection(X: np.ndarray, classes: np.ndarray, centers: np.ndarray, path: Path, seed: int = 0,
               max_points: int = 5000) -> Path:
    """PCA of the L2-normalised features, two panels coloured by class and by center."""
    return save_figure(projection_figure(X, classes, centers, seed, max_points), path, dpi=110)
