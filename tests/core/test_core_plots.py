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


def test_metric_rows_keep_a_resumed_runs_later_row_and_skip_a_torn_line(tmp_path):
    from tubcli.plots import metric_rows

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"member": 0, "epoch": 0, "loss": 3}\n{"member": 0, "epoch": 1, "loss": 2}\n'
                   '{"member": 1, "epoch": 0, "loss": 5}\n{"member": 0, "epoch": 1, "loss": 1.5}\n{"member": 0, "ep')
    rows = metric_rows(log, "epoch", group="member")
    assert [(r["member"], r["epoch"], r["loss"]) for r in rows] == [(0, 0, 3), (1, 0, 5), (0, 1, 1.5)]
    assert metric_rows(tmp_path / "absent.jsonl", "epoch") == []


def test_training_curves_log_axis_for_losses_a_line_per_member_and_none_without_values(tmp_path, monkeypatch):
    import tubcli.plots as plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=120: drawn.append(fig) or path)
    rows = [{"member": m, "epoch": e, "train_loss": 10.0 ** -e, "val_mae": None if e == 0 else 0.5 / e}
            for m in (0, 1) for e in range(4)]
    assert plots.training_curves(tmp_path / "t.png", rows, "epoch", [["train_loss"], ["val_mae", "absent"]],
                                 group="member", best={0: 2, 1: 3}) == tmp_path / "t.png"
    loss, mae = drawn[0].axes
    assert loss.get_yscale() == "log" and mae.get_yscale() == "linear"  # 1e-3..1 spans decades; 0.17..0.5 not
    assert len([ln for ln in loss.get_lines() if ln.get_label().startswith("member")]) == 2
    assert sorted(ln.get_xdata()[0] for ln in loss.get_lines() if ln.get_linestyle() == "--"
                  and ln.get_color() == "grey") == [2, 3]  # the kept epoch of each member
    plots.training_curves(tmp_path / "one.png", rows[:1], "epoch", [["train_loss"]])
    assert list(drawn[1].axes[0].get_xticks()) == [0]  # one epoch: one tick there, not -0.04 ... 0.04
    stale = tmp_path / "stale.png"
    stale.write_bytes(b"old")
    assert plots.training_curves(stale, rows, "epoch", [["absent"]]) is None and not stale.exists()
    for fig in drawn:  # save_figure, replaced here, would have closed them
        plots.pyplot().close(fig)
