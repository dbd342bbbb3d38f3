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


def voltage_plot(path: Path, x, e_formation, steps, capacity_per_x: float | None = None) -> Path:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
    a1.plot(x, e_formation, "o", label="structures")
    hx = [s.x_start for s in steps] + ([steps[-1].x_end] if steps else [])
    order = np.argsort(x)
    hull_e = np.interp(hx, np.asarray(x)[order], np.asarray(e_formation)[order]) if steps else []
    a1.plot(hx, hull_e, "k-", label="lower hull")
    a1.set_xlabel("x in Na$_x$AB")
    a1.set_ylabel("formation energy (eV per AB)")
    a1.legend()
    for s in steps:
        xs = [s.x_start, s.x_end]
        if capacity_per_x:
            xs = [v * capacity_per_x for v in xs]
        a2.plot(xs, [s.voltage, s.voltage], "b-")
    a2.axhline(0, color="grey", lw=0.5)
    a2.set_xlabel("capacity (mAh/g)" if capacity_per_x else "x")
    a2.set_ylabel("V vs Na/Na$^+$")
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
