"""tub-mlff figures (tub_mlff.plots): what they draw, checked on the matplotlib Figure objects.

Voltage profile: plating steps (V <= 0) drawn apart with a "Na plating (V ≤ 0)" legend, the capacity
cut-off marked at the report's capacity, a steps-post staircase, legends and labels clear of the data
and of the other panel. MSD: the fit window shaded, the fitted line MSD = 2 d D t + b with the
reported D (slope exactly 2 d D), D ± err in cm²/s in the legend, Å²/fs labels, axes and element
stated. Parity: Å units, equal aspect and identical limits, MAE/RMSE of the JSON in the title, tick
labels that do not overlap.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.io import write
from tubcli.testing import expect_ok as _ok, invoke

from tub_mlff import plots
from tub_mlff.battery import voltage_profile
from tub_mlff.diffusion import AXES, ase_diffusion_coefficient, diffusion_coefficient, fit_slope


def _drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _legend_texts(ax) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


def _by_gid(ax, gid):
    hits = [a for a in ax.get_children() if a.get_gid() == gid]
    assert hits, f"nothing drawn with gid {gid!r}"
    return hits[0]


def _overlap(b1, b2) -> bool:
    return b1.x0 < b2.x1 and b2.x0 < b1.x1 and b1.y0 < b2.y1 and b2.y0 < b1.y1


# -- voltage profile -------------------------------------------------------------------------------
def _report(ef):
    x = np.array([0, 0.5, 1, 1.5, 2, 3.0])
    steps = [{"x_start": s.x_start, "x_end": s.x_end, "voltage_V": s.voltage, "plating": s.plating}
             for s in voltage_profile(x, np.asarray(ef, dtype=float))]
    return x, np.asarray(ef, dtype=float), steps


PER_X = 86.93  # mAh/g per Na per AB


def test_voltage_plating_steps_are_marked_and_the_capacity_cut_off_drawn():
    x, ef, steps = _report([0, -0.55, -1.0, -1.2, -1.5, -1.2])  # last step 2 -> 3 at -0.3 V: plating
    assert [s["plating"] for s in steps] == [False, False, False, True]
    capacity = 2 * PER_X  # the report's capacity_mAh_g: x_max_before_plating = 2
    fig = plots.voltage_figure(x, ef, steps, PER_X, capacity_mAh_g=capacity)
    a1, a2 = fig.axes[:2]
    assert "Na plating (V ≤ 0)" in _legend_texts(a2)
    assert "Na plating (V ≤ 0)" in _legend_texts(a1)
    # the coloured profile ends at the capacity; the plating step is drawn separately (grey)
    stair = _by_gid(a2, "model-staircase")
    assert stair.get_drawstyle() == "steps-post"
    np.testing.assert_allclose(stair.get_xdata(), [0, 0.5 * PER_X, 1 * PER_X, 2 * PER_X])
    np.testing.assert_allclose(stair.get_ydata()[:-1], [s["voltage_V"] for s in steps[:3]])
    assert max(stair.get_xdata()) == pytest.approx(capacity)
    plating = _by_gid(a2, "model-plating")
    assert plating.get_color() == "grey" and plating.get_drawstyle() == "steps-post"
    np.testing.assert_allclose(plating.get_ydata()[1:], [-0.3, -0.3])
    np.testing.assert_allclose(plating.get_ydata()[0], steps[2]["voltage_V"])  # the vertical join
    cut = _by_gid(a2, "capacity-cutoff")
    np.testing.assert_allclose(cut.get_xdata(), [capacity, capacity])
    assert any(f"{capacity:.1f} mAh/g" in t for t in _legend_texts(a2))
    assert any(c.get_hatch() for c in a2.collections)  # hatched plating area
    # the hull segment into plating is grey on the left panel too
    assert _by_gid(a1, "model-hull-plating").get_color() == "grey"


def test_voltage_layout_legends_and_labels_clear_of_the_data_and_the_other_panel():
    x, ef, steps = _report([0, -0.55, -1.0, -1.2, -1.5, -1.2])
    ref = {"x": x.tolist(), "formation_energy_eV": (ef * 0.9 + 0.05 * x).tolist()}
    ref["steps"] = _report(ref["formation_energy_eV"])[2]
    fig = plots.voltage_figure(x, ef, steps, PER_X, reference=ref, capacity_mAh_g=2 * PER_X)
    r = _drawn(fig)
    a1, a2 = fig.axes[:2]
    for ax in (a1, a2):  # legends outside the axes: never over the hull line or the staircase
        assert not _overlap(ax.get_legend().get_window_extent(r), ax.get_window_extent(r))
    # the right panel's y label does not reach into the left panel
    assert a2.yaxis.label.get_window_extent(r).x0 > a1.get_tightbbox(r).x1
    assert fig.get_layout_engine() is not None  # constrained layout
    for ax in (a1, a2):
        assert ax.yaxis.label.get_fontsize() >= 9 and ax.xaxis.label.get_fontsize() >= 9
        assert all(t.get_fontsize() >= 9 for t in ax.get_xticklabels() + ax.get_yticklabels())
    # the reference's staircase and plating are drawn too, the reference dashed
    assert _by_gid(a2, "reference-staircase").get_linestyle() == "--"
    _by_gid(a2, "reference-plating")


def test_voltage_without_plating_and_demo_call(tmp_path):
    x, ef, steps = _report([0, -0.6, -1.1, -1.5, -1.8, -2.0])
    assert not any(s["plating"] for s in steps)
    fig = plots.voltage_figure(x, ef, steps, PER_X)  # capacity from the steps when not passed
    a2 = fig.axes[1]
    assert "Na plating (V ≤ 0)" not in _legend_texts(a2)
    np.testing.assert_allclose(_by_gid(a2, "capacity-cutoff").get_xdata(), [3 * PER_X] * 2)
    out = plots.voltage_plot(tmp_path / "v.png", x, ef, steps, PER_X, capacity_mAh_g=3 * PER_X)
    assert out.stat().st_size > 0
    # a capacity the sampled x cap is a lower bound, and what the run warned about stays with the figure
    fig = plots.voltage_figure(x, ef, steps, PER_X, capacity_mAh_g=3 * PER_X, capacity_is_lower_bound=True,
                               caveats=["3 of 3 relaxations did not converge"])
    assert any(t.startswith(f"capacity ≥ {3 * PER_X:.1f} mAh/g\n(no plating") for t in _legend_texts(fig.axes[1]))
    assert "CAVEAT: 3 of 3 relaxations did not converge" in fig._supxlabel.get_text()


def _assert_d_in_legend(texts: str, D: float, err: float) -> None:
    """The legend states D ± err in cm²/s, the JSON's numbers to the digits shown."""
    import re

    found = re.search(r"D = ([0-9.e+-]+) ± ([0-9.e+-]+) cm²/s", texts)
    assert found, texts
    assert float(found.group(1)) == pytest.approx(D, rel=6e-3)
    assert float(found.group(2)) == pytest.approx(err, rel=6e-2)


# -- MSD -------------------------------------------------------------------------------------------
def _random_walk(T=200, n=6, seed=0, step=0.3):
    rng = np.random.default_rng(seed)
    pos = np.cumsum(rng.normal(0, step, (T, n, 3)), axis=0)
    pos[:, -2:] = rng.normal(0, 0.01, (T, 2, 3))  # two host atoms that barely move
    return pos


@pytest.mark.parametrize("estimator,axes", [("einstein", "xy"), ("einstein", "xyz"), ("ase", "xy")])
def test_msd_fit_line_is_the_reported_d(estimator, axes):
    pos, dt, blocks = _random_walk(), 10.0, 4
    sel, host = np.arange(4), np.array([4, 5])
    if estimator == "ase":
        res = ase_diffusion_coefficient(pos, dt, atoms=sel, axes=axes, segments=blocks)
    else:
        res = diffusion_coefficient(pos, dt, atoms=sel, axes=axes, blocks=blocks, drift_atoms=host)
    bt, bm = plots.block_mean_msd(pos, sel, axes, dt, blocks, None if estimator == "ase" else host,
                                  one_origin=estimator == "ase")
    window = (res.fit_start_fs, res.fit_end_fs)
    # the line through the block mean over the window is the blocks' mean line: its slope is 2 d D
    inside = (bt >= window[0]) & (bt <= window[1])
    a, b = fit_slope(bt[inside], bm[inside])
    d = len(AXES[axes])
    assert a == pytest.approx(2 * d * res.D, rel=1e-9)
    from tub_mlff.diffusion import msd as full_msd

    m = full_msd(pos, sel, axes, drift_atoms=[] if estimator == "ase" else host)
    curves = {"run (300 K)": {"t": np.arange(len(m)) * dt, "msd": m, "block_t": bt, "block_msd": bm,
                              "window": window, "D_cm2_s": res.D_cm2_s, "D_err_cm2_s": res.D_err_cm2_s,
                              "dims": res.dims}}
    fig = plots.msd_figure(curves, axes, "Na", estimator)
    ax = fig.axes[0]
    line = _by_gid(ax, "run (300 K)-fit")
    xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    np.testing.assert_allclose(xs, window)
    np.testing.assert_allclose((ys[1] - ys[0]) / (xs[1] - xs[0]), 2 * d * res.D, rtol=1e-9)
    np.testing.assert_allclose(ys[0] - 2 * d * res.D * xs[0], b, rtol=1e-6, atol=1e-9)
    span = _by_gid(ax, "run (300 K)-window")
    if hasattr(span, "get_width"):  # a Rectangle (matplotlib >= 3.9), else a Polygon
        edges = [span.get_x(), span.get_x() + span.get_width()]
    else:
        edges = sorted(set(np.round(np.asarray(span.get_xy())[:, 0], 9)))
    np.testing.assert_allclose(edges, window)
    texts = " | ".join(_legend_texts(ax))
    _assert_d_in_legend(texts, res.D_cm2_s, res.D_err_cm2_s)
    assert f"{2 * d}·D·t + b" in texts and "fit window" in texts
    assert "Å²" in ax.get_ylabel() and "fs" in ax.get_xlabel()
    assert axes in ax.get_title() and "Na" in ax.get_title() and f"{d}-D" in ax.get_title()
    # x limited to 1.5 block lengths (not the longest lag of the whole run) and the block length marked
    assert ax.get_xlim()[1] == pytest.approx(min(1.5 * bt[-1], (len(m) - 1) * dt))
    assert any("block length" in t for t in _legend_texts(ax))


def test_arrhenius_figure_draws_the_fit_and_marks_runs_not_diffusive(tmp_path):
    from tub_mlff.diffusion import arrhenius_fit

    T = np.array([500.0, 600.0, 700.0, 800.0])
    D = 1e-3 * np.exp(-0.2 / (8.617333262e-5 * T)) * np.array([1.05, 0.97, 1.02, 0.99])
    runs = [{"temperature_K": t, "D_cm2_s": d, "D_err_cm2_s": 0.1 * d, "not_diffusive": "MSD ∝ t^1.9" if k == 0 else None}
            for k, (t, d) in enumerate(zip(T, D))]
    fit = arrhenius_fit(T, D, 0.1 * D)
    fig = plots.arrhenius_figure(runs, fit, 300.0, "Na", unreliable="not in the diffusive regime: a")
    ax = fig.axes[0]
    line = _by_gid(ax, "fit")
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    np.testing.assert_allclose(y, fit.D(1000 / x), rtol=1e-12)  # ln D linear in 1/T: the fitted line itself
    assert x.min() == pytest.approx(1000 / 800) and x.max() == pytest.approx(1000 / 500)
    texts = " | ".join(_legend_texts(ax))
    assert f"Ea = {fit.Ea:.3f} ± {fit.Ea_err:.3f} eV" in texts and "not in the diffusive regime" in texts
    lo, hi = fit.D_interval(300.0)
    assert f"D(300 K) = {fit.D(300.0):.2e} cm²/s (1σ: {lo:.1e}–{hi:.1e})" in texts and "extrapolated" in texts
    assert 0 < lo < fit.D(300.0) < hi and hi / fit.D(300.0) == pytest.approx(fit.D(300.0) / lo)  # ×/÷, never < 0
    assert "UNRELIABLE" in ax.get_title() and ax.get_yscale() == "log" and "1000 / T" in ax.get_xlabel()
    assert plots.arrhenius_plot(tmp_path / "a.png", runs, fit, 300.0).stat().st_size > 0


def test_msd_legend_marks_a_run_that_is_not_diffusive():
    t = np.arange(40) * 10.0
    r = {"t": t, "msd": 1e-3 * t**2, "block_t": t[1:30], "block_msd": 1e-3 * t[1:30] ** 2, "window": (50.0, 200.0),
         "D_cm2_s": 1e-4, "D_err_cm2_s": 1e-5, "dims": 2}
    texts = _legend_texts(plots.msd_figure({"a (300 K)": {**r, "not_diffusive": "MSD ∝ t^2.0: ballistic"},
                                            "b (600 K)": {**r, "window": (60.0, 250.0)}}).axes[0])
    assert any("a (300 K)" in x and "NOT DIFFUSIVE (MSD ∝ t^2.0: ballistic)" in x for x in texts)
    assert not any("b (600 K)" in x and "NOT DIFFUSIVE" in x for x in texts)


def test_msd_plain_curves_still_plot(tmp_path):
    t = np.arange(50) * 20.0
    fig = plots.msd_figure({"a (300 K)": (t, 0.01 * t)}, "xyz", "Li")
    ax = fig.axes[0]
    assert "Å²" in ax.get_ylabel() and "xyz" in ax.get_title() and "Li" in ax.get_ylabel()
    assert plots.msd_plot(tmp_path / "m.png", {"a (300 K)": (t, 0.01 * t)}).stat().st_size > 0


def test_msd_long_runs_in_ps():
    t = np.arange(100) * 100.0  # 9.9 ps
    ax = plots.msd_figure({"a": (t, 1e-3 * t)}).axes[0]
    assert "ps" in ax.get_xlabel()
    assert ax.get_xlim()[1] == pytest.approx(9.9)


def test_diffusion_cli_draws_the_fit_of_diffusion_json(tmp_path, monkeypatch):
    """The call site passes the fit window, D, its error and the axes: the drawn line is the JSON's D."""
    rng = np.random.default_rng(3)
    T, dt = 60, 20.0
    host = np.array([[0, 0, 5.0], [5, 5, 5.0], [2.5, 7.5, 5.0]])
    na = 5 + np.cumsum(rng.normal(0, 0.25, (T, 3, 3)), axis=0)
    frames = []
    for k in range(T):
        a = Atoms("C3Na3", positions=np.vstack([host + rng.normal(0, 0.02, host.shape), na[k]]),
                  cell=[10, 10, 10], pbc=True)
        a.info.update(time_fs=k * dt, temperature=600.0)
        frames.append(a)
    write(tmp_path / "walk.extxyz", frames)
    figs = []
    real_save = plots.save_figure

    def capture(fig, path, dpi=120):
        figs.append(fig)
        return real_save(fig, path, dpi=dpi)

    monkeypatch.setattr(plots, "save_figure", capture)
    _ok(invoke(["mlff", "diffusion", tmp_path / "walk.extxyz", "--axes", "xyz", "-o", tmp_path / "d"]))
    res = json.loads((tmp_path / "d" / "outputs" / "diffusion.json").read_text())["runs"][0]
    ax = figs[-1].axes[0]
    line = next(a for a in ax.get_lines() if (a.get_gid() or "").endswith("-fit"))
    xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    assert (ys[1] - ys[0]) / (xs[1] - xs[0]) == pytest.approx(2 * 3 * res["D_cm2_s"] / 0.1, rel=1e-9)
    texts = " | ".join(_legend_texts(ax))
    _assert_d_in_legend(texts, res["D_cm2_s"], res["D_err_cm2_s"])
    assert "xyz" in ax.get_title() and "Na" in ax.get_title()
    assert (tmp_path / "d" / "outputs" / "msd.png").stat().st_size > 0


# -- parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("label,unit,scale", [("force", "eV/Å", 3.0), ("stress", "eV/Å³", 0.03),
                                              ("energy per atom", "eV/atom", 0.01)])
def test_parity_units_equal_limits_and_readable_ticks(label, unit, scale):
    rng = np.random.default_rng(1)
    ref = rng.normal(-47.67 if label.startswith("energy") else 0.0, scale, 300)
    pred = ref + rng.normal(0, 0.05 * scale, ref.shape)
    mae, rmse = 1.690851768127676, 2.122419900976697  # as metrics.json holds them (meV units)
    fig = plots.parity_figure(ref, pred, label, unit, mae, rmse, "meV/Å³")
    ax = fig.axes[0]
    assert unit in ax.get_xlabel() and unit in ax.get_ylabel()
    assert "A^" not in ax.get_xlabel() and "(eV/A" not in ax.get_xlabel()
    assert ax.get_xlim() == ax.get_ylim()
    assert ax.get_aspect() == 1.0
    assert "MAE 1.69 meV/Å³" in ax.get_title() and "RMSE 2.12 meV/Å³" in ax.get_title()
    r = _drawn(fig)
    lo, hi = ax.get_xlim()
    for i, ticks in enumerate((ax.get_xticklabels(), ax.get_yticklabels())):
        shown = [t for t in ticks if t.get_text() and lo <= t.get_position()[i] <= hi]
        boxes = [t.get_window_extent(r) for t in shown]
        assert 2 <= len(boxes) <= 6
        assert not any(_overlap(b1, b2) for i, b1 in enumerate(boxes) for b2 in boxes[i + 1:])
        assert all(t.get_fontsize() >= 9 for t in shown)


def test_parity_without_metrics_computes_the_mae(tmp_path):
    ref = np.linspace(-1, 1, 20)
    fig = plots.parity_figure(ref, ref + 0.1, "force", "eV/Å")
    assert "MAE 0.1 eV/Å" in fig.axes[0].get_title()
    assert plots.parity_plot(tmp_path / "p.png", ref, ref + 0.1, "force", "eV/Å").stat().st_size > 0
