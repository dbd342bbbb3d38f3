"""Figures: parity plots, voltage profile, MSD. Matplotlib (Agg), written atomically as PNG.

Each ``*_plot`` writes a PNG and returns its path; the matching ``*_figure`` builds the matplotlib
Figure (what the tests inspect: labels, legends, the fitted line's data, limits). Numbers shown in
titles and legends are the ones the JSON outputs hold (passed in, not recomputed where the caller
has them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.io import pyplot, save_figure

from .diffusion import A2_PER_FS_TO_CM2_PER_S

DPI = 150
FONT = 10  # pt; nothing smaller than 9 pt at slide size


def _style(*axes) -> None:
    """Explicit font sizes (no global rcParams change): labels and titles 10 pt, ticks 9 pt."""
    for ax in axes:
        ax.tick_params(labelsize=9)
        ax.xaxis.label.set_fontsize(FONT)
        ax.yaxis.label.set_fontsize(FONT)
        ax.title.set_fontsize(FONT)


# -- parity --------------------------------------------------------------------------------------
def parity_figure(ref, pred, label: str, unit: str, mae: float | None = None, rmse: float | None = None,
                  metric_unit: str | None = None):
    """Model vs reference with y = x, equal aspect and identical x/y limits.

    ``mae``/``rmse`` in ``metric_unit``: the values of the JSON output (e.g. ``energy_mae_meV_atom``);
    without them the MAE is computed here from the points, in ``unit``.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    ref, pred = np.ravel(np.asarray(ref, dtype=float)), np.ravel(np.asarray(pred, dtype=float))
    fig, ax = plt.subplots(figsize=(4.4, 4.4), layout="constrained")
    ax.scatter(ref, pred, s=14 if ref.size < 200 else 5, alpha=0.6, linewidths=0)
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 1e-3
    lim = (lo - pad, hi + pad)
    ax.plot(lim, lim, "k--", lw=0.8, label="y = x")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal", adjustable="box")
    for axis in (ax.xaxis, ax.yaxis):  # few ticks: long labels (-47.675, 0.0125) must not run together
        axis.set_major_locator(MaxNLocator(nbins=4))
    ax.ticklabel_format(useOffset=False)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel(f"reference {label} ({unit})")
    ax.set_ylabel(f"model {label} ({unit})")
    if mae is None:
        mae, metric_unit = float(np.abs(ref - pred).mean()), unit
    title = f"{label}\nMAE {mae:.3g} {metric_unit or unit}"
    if rmse is not None:
        title += f", RMSE {rmse:.3g} {metric_unit or unit}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _style(ax)
    return fig


def parity_plot(path: Path, ref, pred, label: str, unit: str, mae: float | None = None, rmse: float | None = None,
                metric_unit: str | None = None) -> Path:
    return save_figure(parity_figure(ref, pred, label, unit, mae, rmse, metric_unit), path, dpi=DPI)


# -- voltage profile -----------------------------------------------------------------------------
PLATING_LABEL = "Na plating (V ≤ 0)"


def _plating(step: dict) -> bool:
    return bool(step.get("plating", step["voltage_V"] <= 0))


def _staircase(steps: list[dict], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """x and V of the steps as one ``drawstyle="steps-post"`` line: vertical joins between steps."""
    if not steps:
        return np.array([]), np.array([])
    xs = [s["x_start"] * scale for s in steps] + [steps[-1]["x_end"] * scale]
    vs = [s["voltage_V"] for s in steps] + [steps[-1]["voltage_V"]]
    return np.asarray(xs, dtype=float), np.asarray(vs, dtype=float)


def voltage_figure(x, e_formation, steps: list[dict], capacity_per_x: float | None = None,
                   reference: dict | None = None, capacity_mAh_g: float | None = None,
                   capacity_is_lower_bound: bool = False, caveats: list[str] | None = None):
    """Formation energies with their lower hull (left) and the hull voltage profile (right).

    Steps flagged as Na plating (``plating``, V ≤ 0) are drawn grey and hatched and the capacity
    cut-off (``capacity_mAh_g`` of the report: the end of the last V > 0 step) is marked, as "≥" where
    no sampled x plates yet; the profile is a staircase. ``reference`` (another hull report, e.g. xTB's)
    is drawn dashed. ``caveats`` (what the run warned about its own result) are printed under the panels,
    so that the figure is not quoted without them.
    """
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4.2), layout="constrained")
    scale = capacity_per_x or 1.0
    curves = [("model", x, e_formation, steps, "tab:blue", "o", "-")]
    if reference is not None:
        curves.append(("reference", reference["x"], reference["formation_energy_eV"], reference["steps"],
                       "tab:red", "x", "--"))
    plating_labels = [False, False]  # one legend entry per panel
    vmin, vmax = 0.0, 0.0
    for label, xs, ef, st, color, marker, dash in curves:
        xs, ef = np.asarray(xs, dtype=float), np.asarray(ef, dtype=float)
        order = np.argsort(xs)
        a1.plot(xs, ef, marker, color=color, label=f"{label} structures", zorder=3)
        interp = lambda v: np.interp(v, xs[order], ef[order])  # noqa: E731
        hull_labelled = False
        for s in st:
            seg = [s["x_start"], s["x_end"]]
            if _plating(s):
                a1.plot(seg, interp(seg), dash, color="grey", lw=2.2, gid=f"{label}-hull-plating",
                        label=None if plating_labels[0] else PLATING_LABEL)
                plating_labels[0] = True
            else:
                a1.plot(seg, interp(seg), dash, color=color, lw=1.5, gid=f"{label}-hull",
                        label=None if hull_labelled else f"{label} hull")
                hull_labelled = True
        # hull voltages fall with x: the V > 0 steps, then the plating ones (V <= 0), each a staircase
        good = [s for s in st if not _plating(s)]
        bad = [s for s in st if _plating(s)]
        sx, sv = _staircase(good, scale)
        if len(sx):
            a2.plot(sx, sv, dash, color=color, lw=1.8, drawstyle="steps-post", label=f"{label} hull voltage",
                    gid=f"{label}-staircase")
            vmin, vmax = min(vmin, float(sv.min())), max(vmax, float(sv.max()))
        if bad:
            px, pv = _staircase(bad, scale)
            if good:  # the vertical join down from the last V > 0 step
                px, pv = np.concatenate([[px[0]], px]), np.concatenate([[good[-1]["voltage_V"]], pv])
            a2.plot(px, pv, dash, color="grey", lw=2.2, drawstyle="steps-post", gid=f"{label}-plating", zorder=3)
            vmin, vmax = min(vmin, float(pv.min())), max(vmax, float(pv.max()))
            for s in bad:
                x0, x1 = s["x_start"] * scale, s["x_end"] * scale
                a2.fill_between([x0, x1], [s["voltage_V"]] * 2, 0, facecolor="lightgrey", edgecolor="grey",
                                hatch="///", lw=0.0, label=None if plating_labels[1] else PLATING_LABEL, zorder=1)
                plating_labels[1] = True
    if capacity_mAh_g is None:  # as battery.hull_report: the end of the last V > 0 step
        capacity_mAh_g = max((s["x_end"] for s in steps if not _plating(s)), default=0.0) * scale
    cut = capacity_mAh_g if capacity_per_x else capacity_mAh_g / scale
    at_least = "≥ " if capacity_is_lower_bound else ""
    a2.axvline(cut, color="k", ls=":", lw=1.2,
               label=(f"capacity {at_least}{capacity_mAh_g:.1f} mAh/g" if capacity_per_x else
                      f"cut-off x {'≥' if at_least else '='} {cut:.3g}")
               + ("\n(no plating up to the highest x sampled)" if at_least else ""), gid="capacity-cutoff")
    ref_cap = (reference or {}).get("capacity_mAh_g")
    if ref_cap is not None and capacity_per_x and not np.isclose(ref_cap, capacity_mAh_g):
        a2.axvline(ref_cap, color="tab:red", ls=":", lw=1.2, label=f"reference capacity {ref_cap:.1f} mAh/g",
                   gid="reference-capacity-cutoff")
    a1.set_xlabel("x in Na$_x$AB")
    a1.set_ylabel("formation energy (eV per AB)")
    a1.grid(alpha=0.3)
    a2.axhline(0, color="grey", lw=0.6)
    a2.set_xlabel("capacity (mAh/g)" if capacity_per_x else "x in Na$_x$AB")
    a2.set_ylabel("V vs Na/Na$^+$ (V)")
    a2.grid(alpha=0.3)
    span = max(vmax - vmin, 0.1)
    a2.set_ylim(vmin - 0.08 * span, vmax + 0.08 * span)
    if capacity_per_x:
        top = a2.secondary_xaxis("top", functions=(lambda c: c / scale, lambda v: v * scale))
        top.set_xlabel("x in Na$_x$AB")
    # legends below the panels: outside the data, never over the hull or the staircase
    for ax in (a1, a2):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False, fontsize=9)
    if caveats:
        fig.get_layout_engine().set(h_pad=0.1)
        fig.supxlabel("\n".join(f"CAVEAT: {c}" for c in caveats), fontsize=8.5, color="darkred", ha="left", x=0.01)
    _style(a1, a2)
    return fig


def voltage_plot(path: Path, x, e_formation, steps: list[dict], capacity_per_x: float | None = None,
                 reference: dict | None = None, capacity_mAh_g: float | None = None,
                 capacity_is_lower_bound: bool = False, caveats: list[str] | None = None) -> Path:
    """Formation energies with their lower hull, and the hull voltage profile (steps as in
    ``battery.hull_report``); see :func:`voltage_figure`."""
    return save_figure(voltage_figure(x, e_formation, steps, capacity_per_x, reference, capacity_mAh_g,
                                      capacity_is_lower_bound, caveats), path, dpi=DPI)


# -- MSD -----------------------------------------------------------------------------------------
def fit_line(t, y, window: tuple[float, float], D_cm2_s: float, dims: int) -> tuple[float, float]:
    """Slope (Å²/fs) and intercept (Å²) of the fitted MSD = 2 d D t + b.

    The slope is the reported D (2 d D, D in Å²/fs); b is the least-squares intercept of the
    block-averaged MSD ``y`` over the fit window: each block's straight line passes through the
    centroid of its window, so the mean of the blocks' lines is ȳ - slope t̄ over that window.
    """
    t, y = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    slope = 2 * dims * D_cm2_s / A2_PER_FS_TO_CM2_PER_S
    inside = (t >= window[0] - 1e-9) & (t <= window[1] + 1e-9)
    b = float(y[inside].mean() - slope * t[inside].mean()) if inside.any() else 0.0
    return float(slope), b


def block_mean_msd(positions, atoms, axes: str, timestep_fs: float, blocks: int, drift_atoms=None,
                   one_origin: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Lag times (fs) and the MSD averaged over the blocks that ``diffusion_coefficient`` fits (all
    origins, drift removed as given) or, ``one_origin``, over the segments of
    ``ase_diffusion_coefficient`` (MSD from each segment's first frame, summed over ``axes``, no drift).
    Least squares being linear in y, the line fitted to this mean has the mean slope of the blocks."""
    from .diffusion import AXES, msd

    pos = np.asarray(positions, dtype=float)
    L = pos.shape[0] // blocks
    ax = AXES[axes] if isinstance(axes, str) else list(axes)
    if one_origin:
        sel = pos[:, atoms][:, :, ax]
        ms = [((sel[k * L:(k + 1) * L] - sel[k * L]) ** 2).sum(axis=2).mean(axis=1) for k in range(blocks)]
    else:
        ms = [msd(pos[k * L:(k + 1) * L], atoms, ax, drift_atoms=drift_atoms) for k in range(blocks)]
    return np.arange(L) * float(timestep_fs), np.mean(ms, axis=0)


def _d_text(D: float, err: float | None) -> str:
    """D ± error (cm²/s) to 3 and 2 significant digits: the values of diffusion.json, rounded."""
    if err is None or not np.isfinite(err):
        return f"D = {D:.2e} cm²/s"
    return f"D = {D:.2e} ± {err:.1e} cm²/s"


def msd_figure(curves: dict, axes: str = "xy", element: str = "Na", estimator: str = "einstein"):
    """MSD per trajectory with its fit: the whole run's MSD (all origins, thin line), the block-averaged
    MSD that was fitted (markers), the fit window (shaded) and the fitted line MSD = 2 d D t + b
    (black, solid in the window, dashed beyond it), D ± error per run in the legend; x limited to
    1.5 block lengths (the block length marked).

    ``curves``: label -> (t_fs, msd_A2) (no fit drawn), or a dict with ``t``, ``msd`` and, for the fit,
    ``block_t``, ``block_msd``, ``window`` (t0, t1 in fs), ``D_cm2_s``, ``D_err_cm2_s``, ``dims``.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = pyplot()
    dims = {"x": 1, "y": 1, "z": 1, "xy": 2, "xz": 2, "yz": 2, "xyz": 3}.get(axes, len(axes))
    runs = {k: (v if isinstance(v, dict) else {"t": v[0], "msd": v[1]}) for k, v in curves.items()}
    fitted = [r for r in runs.values() if r.get("block_t") is not None]
    n_entries = len(runs) + (3 + len({tuple(r["window"]) for r in fitted})
                             + len({float(np.max(r["block_t"])) for r in fitted}) if fitted else 0)
    fig, ax = plt.subplots(figsize=(5.8, 3.6 + 0.21 * n_entries), layout="constrained")
    t_all = [np.asarray(r["t"], dtype=float) for r in runs.values()]
    t_end = max((float(t[-1]) for t in t_all if len(t)), default=1.0)
    block_end = max((float(np.max(r["block_t"])) for r in fitted), default=None)
    xmax = t_end if block_end is None else min(t_end, 1.5 * block_end)
    ps = xmax > 5000  # long runs in ps
    f = 1e-3 if ps else 1.0
    tu = "ps" if ps else "fs"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles, windows = [], {}
    for k, (label, r) in enumerate(runs.items()):
        c = colors[k % len(colors)]
        t, m = np.asarray(r["t"], dtype=float), np.asarray(r["msd"], dtype=float)
        keep = t <= xmax * (1 + 1e-9)
        fit = r.get("block_t") is not None
        ln, = ax.plot(t[keep] * f, m[keep], color=c, lw=1.0 if fit else 1.6, alpha=0.6 if fit else 1.0)
        text = label
        if fit:
            bt, bm = np.asarray(r["block_t"], dtype=float), np.asarray(r["block_msd"], dtype=float)
            t0, t1 = r["window"]
            ax.plot(bt * f, bm, "o", color=c, ms=3.5, zorder=3)
            if (t0, t1) not in windows:  # in the run's colour: two runs' windows are told apart
                windows[(t0, t1)] = ax.axvspan(t0 * f, t1 * f, color=c, alpha=0.12, lw=0, gid=f"{label}-window")
            else:
                ax.axvspan(t0 * f, t1 * f, alpha=0.0, lw=0, gid=f"{label}-window")  # same window, drawn once
            slope, b = fit_line(bt, bm, (t0, t1), r["D_cm2_s"], r.get("dims", dims))
            tt = np.array([t0, t1])
            ax.plot(tt * f, slope * tt + b, "-", color="k", lw=1.6, gid=f"{label}-fit", zorder=4)
            te = np.array([0.0, float(bt[-1])])
            ax.plot(te * f, slope * te + b, "--", color="k", lw=0.8, alpha=0.7, zorder=4)
            text = f"{label}: {_d_text(r['D_cm2_s'], r.get('D_err_cm2_s'))}"
            if r.get("not_diffusive"):  # as diffusion.json and the log say: a reader of the figure alone sees it
                text += f" — NOT DIFFUSIVE ({r['not_diffusive']})"
        ln.set_label(text)
        handles.append(ln)
    if fitted:
        d_fit = fitted[0].get("dims", dims)
        what = "segment mean, one origin" if estimator == "ase" else "block mean"
        handles += [Line2D([], [], color="grey", lw=1.0, alpha=0.6, label="whole run, all time origins (line)"),
                    Line2D([], [], color="grey", ls="", marker="o", ms=3.5, label=f"{what} (fitted, markers)"),
                    Line2D([], [], color="k", lw=1.6, label=f"fit MSD = {2 * d_fit}·D·t + b (dashed: extended)")]
        handles += [Patch(color=h.get_facecolor(), label=f"fit window {t0 * f:g}–{t1 * f:g} {tu}")
                    for (t0, t1), h in windows.items()]
    block_ends = sorted({float(np.max(r["block_t"])) for r in fitted})
    for end in block_ends:  # each run's own block length (runs of different lengths have different ones)
        handles.append(ax.axvline(end * f, color="grey", ls=":", lw=1, label=f"block length {end * f:g} {tu}"))
    ax.set_xlim(0, xmax * f)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"lag time ({tu})")
    ax.set_ylabel(f"MSD$_{{{axes}}}$ of {element} (Å²)")
    ax.set_title(f"{element} MSD along {axes} ({dims}-D), {estimator} estimator")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False, ncol=1, fontsize=9)
    _style(ax)
    return fig


def msd_plot(path: Path, curves: dict, axes: str = "xy", element: str = "Na", estimator: str = "einstein") -> Path:
    return save_figure(msd_figure(curves, axes, element, estimator), path, dpi=DPI)


def arrhenius_figure(runs: list[dict], fit, target_T: float, element: str = "Na", unreliable: str | None = None):
    """D(T) on a log axis against 1000/T: each run's D with its standard error (open markers: runs not in
    the diffusive regime), the weighted fit ln D = ln D0 - Ea/(kB T) over the runs' range (solid) and its
    extrapolation to ``target_T`` (dashed, with the fit's one-standard-error range of D there, ×/÷ exp(σ ln D)).
    ``runs``: the ``runs`` of
    diffusion.json; ``fit``: :class:`~tub_mlff.diffusion.ArrheniusFit`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4), layout="constrained")
    T = np.array([r["temperature_K"] for r in runs], dtype=float)
    D = np.array([r["D_cm2_s"] for r in runs], dtype=float)
    err = np.array([np.nan if r.get("D_err_cm2_s") is None else r["D_err_cm2_s"] for r in runs], dtype=float)
    bad = np.array([bool(r.get("not_diffusive")) for r in runs])
    for mask, face, label in ((~bad, "tab:blue", "MD runs (D ± standard error)"),
                              (bad, "none", "not in the diffusive regime")):
        if mask.any():
            ax.errorbar(1000 / T[mask], D[mask], yerr=np.where(np.isfinite(err[mask]), err[mask], 0), fmt="o",
                        color="tab:blue", mfc=face, ms=6, capsize=3, label=label, zorder=3, gid=f"points-{face}")
    lo, hi = T.min(), T.max()
    tt = np.linspace(lo, hi, 50)
    ea = f"Ea = {fit.Ea:.3f} ± {fit.Ea_err:.3f} eV" if np.isfinite(fit.Ea_err) else f"Ea = {fit.Ea:.3f} eV"
    ax.plot(1000 / tt, fit.D(tt), "-", color="k", lw=1.4, label=f"fit: {ea}", gid="fit")
    if not lo <= target_T <= hi:
        te = np.linspace(min(lo, target_T), max(hi, target_T), 50)
        ax.plot(1000 / te, fit.D(te), "--", color="k", lw=0.9, alpha=0.7, label="extrapolated")
    d_t, (lo_t, hi_t) = fit.D(target_T), fit.D_interval(target_T)
    known = np.isfinite(lo_t)
    span = f" (1σ: {lo_t:.1e}–{hi_t:.1e})" if known else ""  # ×/÷ exp(σ ln D): the fit is linear in ln D
    ax.errorbar([1000 / target_T], [d_t], yerr=[[d_t - lo_t if known else 0.0], [hi_t - d_t if known else 0.0]],
                fmt="s", color="tab:red", ms=6, capsize=3, zorder=4, gid="target",
                label=f"D({target_T:g} K) = {d_t:.2e} cm²/s{span}")
    ax.set_yscale("log")
    ax.set_xlabel("1000 / T (1/K)")
    ax.set_ylabel(f"D of {element} (cm²/s)")
    title = f"Arrhenius fit, {element}, {len(set(T.tolist()))} temperatures"
    if unreliable:
        title += "\nUNRELIABLE: runs not in the diffusive regime"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False, fontsize=9)
    _style(ax)
    return fig


def arrhenius_plot(path: Path, runs: list[dict], fit, target_T: float, element: str = "Na",
                   unreliable: str | None = None) -> Path:
    return save_figure(arrhenius_figure(runs, fit, target_T, element, unreliable), path, dpi=DPI)
