"""Figures: parity plots, voltage profile, MSD. Matplotlib (Agg), written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.io import pyplot, save_figure


def parity_plot(path: Path, ref, pred, label: str, unit: str) -> Path:
    plt = pyplot()
    ref, pred = np.ravel(ref), np.ravel(pred)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(ref, pred, s=4, alpha=0.6)
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    mae = np.abs(ref - pred).mean()
    ax.set_xlabel(f"reference {label} ({unit})")
    ax.set_ylabel(f"model {label} ({unit})")
    ax.set_title(f"{label}: MAE {mae:.3g} {unit}")
    save_figure(fig, path)
    plt.close(fig)
    return path


def voltage_plot(path: Path, x, e_formation, steps: list[dict], capacity_per_x: float | None = None,
                 reference: dict | None = None) -> Path:
    """Formation energies with their lower hull, and the hull voltage profile (steps as in
    ``battery.hull_report``); ``reference`` (another hull report, e.g. xTB's) is drawn dashed."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
    curves = [("model", x, e_formation, steps, "b", "o", "-")]
    if reference is not None:
        curves.append(("reference", reference["x"], reference["formation_energy_eV"], reference["steps"],
                       "r", "x", "--"))
    for label, xs, ef, st, color, marker, dash in curves:
        xs, ef = np.asarray(xs), np.asarray(ef)
        a1.plot(xs, ef, marker, color=color, label=f"{label} structures")
        hx = [s["x_start"] for s in st] + ([st[-1]["x_end"]] if st else [])
        order = np.argsort(xs)
        a1.plot(hx, np.interp(hx, xs[order], ef[order]) if st else [], dash, color=color, label=f"{label} hull")
        scale = capacity_per_x or 1.0
        for k, s in enumerate(st):
            a2.plot([s["x_start"] * scale, s["x_end"] * scale], [s["voltage_V"]] * 2, dash, color=color,
                    label=label if k == 0 else None)
    a1.set_xlabel("x in Na$_x$AB")
    a1.set_ylabel("formation energy (eV per AB)")
    a1.legend()
    a2.axhline(0, color="grey", lw=0.5)
    a2.set_xlabel("capacity (mAh/g)" if capacity_per_x else "x")
    a2.set_ylabel("V vs Na/Na$^+$")
    if reference is not None:
        a2.legend()
    save_figure(fig, path)
    plt.close(fig)
    return path


def msd_plot(path: Path, curves: dict) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for label, (t, m) in curves.items():
        ax.plot(t, m, label=label)
    ax.set_xlabel("lag (fs)")
    ax.set_ylabel("MSD (A$^2$)")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)
    return path
