"""Figures of tub-knnlrp: what red/blue mean in the heatmaps, colour bar, flipping legend (read back from
the matplotlib Figure, no pixels)."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

from tub_knnlrp.explanation import explain  # noqa: E402
from tub_knnlrp.plots import flipping_curves_plot, relevance_heatmaps  # noqa: E402


def _heatmap_axes(fig, n):
    """The 2 x n image axes (the colour bar axes is the extra one)."""
    img = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    return img[:n], img[n:2 * n]


def _check_heatmaps(fig, e):
    n = len(e.values)
    top, bottom = _heatmap_axes(fig, n)
    assert len(top) == len(bottom) == n
    for i in range(n):
        title = top[i].get_title()
        assert f"pred {e.prediction[i]}" in title
        assert f"red → {e.positive[i]}" in title and f"blue → {e.negative[i]}" in title
        im = bottom[i].images[0]
        assert im.get_cmap().name == "bwr"
        lo, hi = im.get_clim()
        assert lo == -hi  # diverging, centred at 0
        label = bottom[i].get_xlabel()
        assert f"max|R| {np.abs(e.values[i]).max():.3g}" in label
        assert f"g {e.output[i]:.3g}" in label
    # a colour bar saying what red and blue are
    cbars = [ax for ax in fig.axes if ax not in top + bottom]
    assert len(cbars) == 1
    assert "red" in cbars[0].get_ylabel() and "blue" in cbars[0].get_ylabel()


def test_binary_heatmap_titles_name_the_explained_pair(digits49, tmp_path):
    Xtr, Xte, ytr, _ = digits49
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    e = explain(knn, Xte[:6])
    # binary: always classes_[1] (red) against classes_[0] (blue), whatever the prediction
    assert set(e.positive) == {knn.classes_[1]} and set(e.negative) == {knn.classes_[0]}
    fig = relevance_heatmaps(tmp_path / "h.png", e.data, e.values, 8, prediction=e.prediction,
                             positive=e.positive, negative=e.negative, output=e.output)
    assert (tmp_path / "h.png").stat().st_size > 1000
    _check_heatmaps(fig, e)


def test_multiclass_heatmap_titles_name_prediction_and_runner_up(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, [1, 4, 7, 9])
    X, y = d.data[keep], d.target[keep]
    knn = KNeighborsClassifier(5).fit(X[:300], y[:300])
    e = explain(knn, X[300:306])
    assert np.array_equal(e.positive, e.prediction)  # multiclass: predicted class vs its runner-up
    assert not np.any(e.positive == e.negative)
    fig = relevance_heatmaps(tmp_path / "m.png", e.data, e.values, 8, prediction=e.prediction,
                             positive=e.positive, negative=e.negative, output=e.output)
    _check_heatmaps(fig, e)


def test_flipping_legend_says_aupc_lower_is_better_and_rows(tmp_path):
    curve = list(np.linspace(1.0, 0.0, 6))
    rows = [["mean", "lrp", 0.1234, 0.2, 0.01] + curve, ["mean", "random", 0.5678, 0.6, 0.0] + curve[::-1],
            ["kde", "lrp", 0.3456, 0.4, 0.01] + curve]
    fig = flipping_curves_plot(tmp_path / "f.png", rows, n_rows=37)
    assert (tmp_path / "f.png").stat().st_size > 1000
    axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(axes) == 2
    for ax in axes:
        leg = ax.get_legend()
        assert all(t.get_fontsize() >= 8 for t in leg.get_texts())
        head = leg.get_title().get_text()
        assert "AUPC" in head and "lower is better" in head
        assert "37 rows" in ax.get_title() + ax.get_ylabel()
    labels = {t.get_text() for ax in axes for t in ax.get_legend().get_texts()}
    assert labels == {"lrp (0.123)", "random (0.568)", "lrp (0.346)"}  # the numbers of flipping.csv
    fig = flipping_curves_plot(tmp_path / "g.png", rows, n_rows=37, kind="knn")
    assert all(ax.get_ylabel().startswith("p(explained class) − max p(other class)") for ax in fig.axes)
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()  # the panels compare on one scale
