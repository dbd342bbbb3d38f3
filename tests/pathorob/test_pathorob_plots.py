"""Figures of tub-pathorob: legends outside the axes, SO/SS/OS/OO explained, PC axes, subsampling note,
RI(k) labels (read back from the matplotlib Figure, no pixels)."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from tub_pathorob.breakdown import breakdown  # noqa: E402
from tub_pathorob.plots import (STACK, composition_bars, composition_figure, projection,  # noqa: E402
                                projection_figure, ri_curve, ri_curve_figure)
from tub_pathorob.robustness_index import robustness_index  # noqa: E402
from tub_pathorob.synthetic import synthetic_features  # noqa: E402


@pytest.fixture(scope="module")
def made():
    X, meta = synthetic_features(classes=("tumor", "normal", "stroma"), centers=("RUMC", "UMCU", "CWZ"),
                                 slides_per_cell=3, tiles_per_slide=10, dim=16, seed=0)
    res = robustness_index(X, meta, k=5, auc=False)
    return X, meta, res, breakdown(res, 5)


def _outside(fig, ax, legend):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    lb, ab = legend.get_window_extent(r), ax.get_window_extent(r)
    return not lb.overlaps(ab)


def test_composition_legend_outside_in_stack_order_and_explained(made, tmp_path):
    *_, bd = made
    assert composition_bars(bd, tmp_path / "c.png").stat().st_size > 1000
    fig = composition_figure(bd)
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    ax, leg = legends[0]
    assert all(_outside(fig, a, leg) for a in fig.axes)  # covers no bars
    labels = [t.get_text() for t in leg.get_texts()]
    assert [lab[:2] for lab in labels] == list(STACK)[::-1]  # top of the stack first
    for cat, words in (("SO", ("same class", "other center")), ("OS", ("other class", "same center")),
                       ("SS", ("same class", "same center")), ("OO", ("other class", "other center"))):
        (lab,) = [lab for lab in labels if lab.startswith(cat)]
        assert all(w in lab for w in words)
    # the stack bottom-up follows STACK, heights are the breakdown.json shares
    top = fig.axes[0]
    names = list(bd["per_class"])
    for j, cat in enumerate(STACK):
        bars = top.containers[j]
        assert np.allclose([b.get_height() for b in bars], [bd["per_class"][n][cat] for n in names])
    for t in top.get_xticklabels():
        assert t.get_ha() == "right" and t.get_rotation() > 0
    # a panel with SO and OS only (the shares that define RI)
    so_os = [a for a in fig.axes if "SO and OS" in a.get_title()]
    assert len(so_os) == 2
    hs = [b.get_height() for c in so_os[0].containers for b in c]
    assert np.allclose(hs, [bd["per_class"][n][c] for c in ("SO", "OS") for n in names])


def test_projection_pc_labels_and_subsampling_note(made, tmp_path):
    X, meta, *_ = made
    n = len(X)
    fig = projection_figure(X, meta.biological_class, meta.medical_center, max_points=50)
    text = fig._suptitle.get_text()
    assert f"50 of {n}" in text and "subsample" in text
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("PC1 (") and "%" in ax.get_xlabel()
        assert ax.get_ylabel().startswith("PC2 (") and "%" in ax.get_ylabel()
        assert _outside(fig, ax, ax.get_legend())
    assert "biological class" in fig.axes[0].get_title() and "medical center" in fig.axes[1].get_title()
    class_colours, center_colours = ({tuple(h.get_color()) for h in ax.get_legend().legend_handles} for ax in fig.axes)
    assert not class_colours & center_colours  # no class shares a colour with a center
    fig = projection_figure(X, meta.biological_class, meta.medical_center, max_points=10 * n)
    assert f"all {n}" in fig._suptitle.get_text()
    assert projection(X, meta.biological_class, meta.medical_center, tmp_path / "p.png",
                      max_points=50).stat().st_size > 1000


def test_ri_curve_labels_and_selected_k(made, tmp_path):
    *_, res, _ = made
    fig = ri_curve_figure(res.curves, 5, k_max=40)
    ax = fig.axes[0]
    assert "robustness index" in ax.get_ylabel()
    assert ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    ri_k = res.curves["robustness_index"][4]
    assert f"k_opt = 5 (RI {ri_k:.3f})" in labels
    assert res.summary["robustness_index"] == pytest.approx(ri_k)  # the number of the results JSON
    assert _outside(fig, ax, ax.get_legend())
    assert ri_curve(res.curves, 5, tmp_path / "r.png", 40).stat().st_size > 1000
    assert "ID performance (SS / (SS + OS))" in labels and "OOD performance (SO / (SO + OO))" in labels
    chosen = [t.get_text() for t in ri_curve_figure(res.curves, 5, k_max=40, k_name="k").axes[0].get_legend().get_texts()]
    assert f"k = 5 (RI {ri_k:.3f})" in chosen and not any("k_opt" in t for t in chosen)  # a --k, not optimised
