"""ROC curves drawn by several plugins: the points and area are scikit-learn's, ties included."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

from tubcli.plots import area, roc_plot, roc_points  # noqa: E402


@pytest.mark.parametrize("n", [2, 7, 300])
def test_roc_points_and_area_equal_scikit_learn_with_tied_scores(n):
    rng = np.random.default_rng(n)
    y = np.r_[True, False, rng.random(n - 2) < 0.3]
    s = np.round(rng.random(n) + 0.4 * y, 1)  # rounded: many tied scores across classes
    fpr, tpr = roc_points(y, s)
    ref_fpr, ref_tpr, _ = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)
    assert area(fpr, tpr) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)


def test_roc_points_of_a_perfect_and_a_reversed_score():
    y = np.array([0, 0, 1, 1], bool)
    assert area(*roc_points(y, [0.1, 0.2, 0.8, 0.9])) == 1.0
    assert area(*roc_points(y, [0.9, 0.8, 0.2, 0.1])) == 0.0
    assert area(*roc_points(y, [0.5] * 4)) == 0.5  # one tied group: the diagonal


def test_roc_plot_per_class_with_folds_and_none_for_one_class(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    p = rng.dirichlet(np.ones(3), 30)
    fig = roc_plot(tmp_path / "roc3.png", y, p, ["a", "b", "c"], folds=np.arange(30) % 2, unit="tiles")
    assert fig is not None and fig.stat().st_size > 0
    assert roc_plot(tmp_path / "one.png", np.zeros(5, int), p[:5], ["a", "b", "c"]) is None
    assert not (tmp_path / "one.png").exists()


def test_a_library_caller_keeps_its_matplotlib_backend_and_the_command_draws_on_agg(tmp_path):
    """pyplot() switched every caller to Agg: a notebook's inline figures stopped showing after one call of
    a plugin's plot function. Only the `tub` command chooses Agg now."""
    import os
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); from tubcli.io import pyplot; pyplot().figure(); "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"
    code = ("import os, sys; from tubcli.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "sys.stderr.write(os.environ['MPLBACKEND'])")
    env = {**os.environ, "MPLBACKEND": "TkAgg"}  # a desktop setting does not reach a batch job's figures
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stderr
    assert err.strip().endswith("Agg") and not err.strip().endswith("TkAgg")
