"""Figures: relevance heatmaps for pixel features and feature-flipping curves (matplotlib, Agg)."""

from __future__ import annotations

import numpy as np

from tubcli.io import pyplot, save_figure


def heatmap_title(prediction, positive, negative) -> str:
    """What a relevance panel shows: red favours ``positive`` (g > 0), blue favours ``negative``.

    Binary models always explain classes_[1] against classes_[0], whatever the prediction; multiclass
    models the predicted class against its strongest competitor (see :mod:`tub_knnlrp.explanation`)."""
    return f"pred {prediction}\nred → {positive}\nblue → {negative}"


def relevance_heatmaps_figure(data, values, side: int, titles=None, *, prediction=None, positive=None,
                              negative=None, output=None):
    """The figure of :func:`relevance_heatmaps` (not saved, not closed)."""
    plt = pyplot()
    values = np.asarray(values, dtype=float)
    n = len(values)
    cols = max(n, 1)
    fig, axes = plt.subplots(2, cols, figsize=(1.35 * cols + 0.9, 3.6), squeeze=False)
    im = None
    for i in range(n):
        axes[0, i].imshow(np.asarray(data[i]).reshape(side, side), cmap="gray_r")
        lim = float(np.abs(values[i]).max()) or 1.0
        # each panel is scaled to its own max |R| (printed under it); the colour bar is in units of that max
        im = axes[1, i].imshow(values[i].reshape(side, side) / lim, cmap="bwr", vmin=-1.0, vmax=1.0)
        if positive is not None and negative is not None:
            pred = prediction[i] if prediction is not None else "?"
            title = heatmap_title(pred, positive[i], negative[i])
        elif titles is not None:
            title = str(titles[i])
        else:
            title = None
        if title is not None:
            axes[0, i].set_title(title, fontsize=7)
        info = [f"max|R| {lim:.3g}"]
        if output is not None:
            info.append(f"g {float(output[i]):.3g}")
        axes[1, i].set_xlabel("\n".join(info), fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if n == 0:
        axes[0, 0].set_axis_off()
        axes[1, 0].set_axis_off()
    fig.tight_layout(rect=(0, 0, 1 - 0.9 / (1.35 * cols + 0.9), 1))
    if im is not None:
        cax = fig.add_axes([1 - 0.75 / (1.35 * cols + 0.9), 0.12, 0.15 / (1.35 * cols + 0.9), 0.36])
        cb = fig.colorbar(im, cax=cax, ticks=[-1, 0, 1])
        cb.ax.set_yticklabels(["−max|R|", "0", "+max|R|"], fontsize=6)
        cb.set_label("relevance (per panel)\nred: for the 'red →' class\nblue: for the 'blue →' class", fontsize=7)
    return fig


def relevance_heatmaps(path, data, values, side: int, titles=None, *, prediction=None, positive=None,
                       negative=None, output=None):
    """Input image (grey) above its relevance (red = for ``positive``, blue = for ``negative``, centred at 0).

    Pass the class pair of each row (``Explanation.positive``/``negative``) so that the titles say what red
    and blue favour, and ``output`` (the explained g) to print it under each panel; ``titles`` is used
    only when no class pair is given. Returns the (closed) figure."""
    fig = relevance_heatmaps_figure(data, values, side, titles, prediction=prediction, positive=positive,
                                    negative=negative, output=output)
    save_figure(fig, path, dpi=110)
    return fig


SCORES = {"knn": "p(explained class) − max p(other class)", "svm": "decision value against the nearest other class"}


def flipping_curves_figure(rows, n_rows: int | None = None, kind: str | None = None):
    """The figure of :func:`flipping_curves_plot` (not saved, not closed); ``kind`` ("knn", "svm") names the
    score on the y axis (scores.FlippingScore.soft), shared by the panels."""
    plt = pyplot()
    repls = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, max(len(repls), 1), figsize=(7 * max(len(repls), 1), 3.9), squeeze=False,
                             sharey=True)
    over = f"mean over {n_rows} rows" if n_rows is not None else "mean over the rows"
    for ax, repl in zip(axes[0], repls):
        for j, r in enumerate(r for r in rows if r[0] == repl):
            curve = np.asarray(r[5:], dtype=float)
            ax.plot(np.linspace(0, 1, len(curve)), curve, label=f"{r[1]} ({r[2]:.3f})",
                    lw=2.2 if r[1] == "lrp" else 1.0, ls=("-", "--", ":")[(j // 10) % 3])
        ax.set_xlabel("fraction of features flipped (most relevant first)")
        ax.set_ylabel(f"{SCORES.get(kind, 'score of the explained class')}\n({over})")
        ax.set_title(f"feature flipping ({repl} replacement)", fontsize=10)
        ax.legend(fontsize=8, title="method (raw AUPC,\nlower is better)", title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def flipping_curves_plot(path, rows, n_rows: int | None = None, kind: str | None = None):
    """rows: [replacement, method, aupc, aupc_normalised, seconds, *curve] as written to flipping.csv; the
    curves are means over ``n_rows`` explained rows. Returns the (closed) figure."""
    fig = flipping_curves_figure(rows, n_rows, kind)
    save_figure(fig, path, dpi=110)
    return fig
