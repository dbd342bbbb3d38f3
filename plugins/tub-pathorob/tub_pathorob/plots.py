"""Plots for ``explain``: neighbour-composition bars, RI(k) curve, center-pair heatmap and a 2-D
projection coloured by class and by center (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.io import pyplot, save_figure

COLORS = {"SS": "#4c72b0", "SO": "#55a868", "OS": "#c44e52", "OO": "#8c8c8c"}


def composition_bars(bd: dict, path: Path) -> Path:
    plt = pyplot()
    groups = [("class", bd["per_class"]), ("center", bd["per_center"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, table) in zip(axes, groups):
        names = list(table)
        bottom = np.zeros(len(names))
        for cat in ("SO", "SS", "OS", "OO"):
            vals = np.array([table[n][cat] for n in names])
            ax.bar(names, vals, bottom=bottom, color=COLORS[cat], label=cat)
            bottom += vals
        for i, n in enumerate(names):
            ax.text(i, 1.01, f"RI {table[n]['robustness_index']:.2f}", ha="center", fontsize=8)
        ax.set_title(f"first {bd['k']} neighbours by query {title}")
        ax.tick_params(axis="x", rotation=45)
        ax.set_ylim(0, 1.1)
    axes[0].set_ylabel("fraction of neighbours")
    axes[1].legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, dpi=110)


def ri_curve(curves: dict, k: int, path: Path, k_max: int = 200) -> Path:
    plt = pyplot()
    ri = curves["robustness_index"][:k_max]
    ks = np.arange(1, len(ri) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, ri, color="k", label="robustness index")
    ax.plot(ks, curves["ID_performance"][:k_max], color=COLORS["SS"], label="ID performance")
    ax.plot(ks, curves["OOD_performance"][:k_max], color=COLORS["SO"], label="OOD performance")
    ax.axvline(k, ls="--", color="grey")
    ax.set_xlabel("k")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


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


def projection(X: np.ndarray, classes: np.ndarray, centers: np.ndarray, path: Path, seed: int = 0,
               max_points: int = 5000) -> Path:
    """PCA of the L2-normalised features, two panels coloured by class and by center."""
    from sklearn.decomposition import PCA

    plt = pyplot()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(X))[:max_points]
    Xn = X[idx] / np.linalg.norm(X[idx], axis=1, keepdims=True)
    Z = PCA(n_components=2, random_state=seed).fit_transform(Xn)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, labels, title in ((axes[0], classes[idx], "biological class"), (axes[1], centers[idx], "medical center")):
        for i, name in enumerate(sorted(set(labels))):
            m = labels == name
            ax.scatter(Z[m, 0], Z[m, 1], s=4, alpha=0.6, label=name, color=plt.cm.tab10(i % 10))
        ax.set_title(f"PCA coloured by {title}")
        ax.legend(markerscale=3, fontsize=7)
    return save_figure(fig, path, dpi=110)
