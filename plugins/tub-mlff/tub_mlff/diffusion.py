"""Tracer diffusion from MD: unwrapped mean-squared displacement and the Einstein relation.

D = lim_{t->inf} MSD(t) / (2 d t) for d Cartesian axes (d = 2, x and y, for in-plane motion in a
layered host). MSD is averaged over atoms and over several time origins; the drift (mean
displacement) of a reference group is removed: all atoms by default here, the host framework
(every other element) in ``tub mlff diffusion``, as pymatgen's DiffusionAnalyzer does, so that a
few fast ions in a small cell do not drag the reference along; the fit skips the early (ballistic)
part. Error bars come from fitting the MSD of independent blocks of the trajectory. Temperature
dependence: Arrhenius, ln D = ln D0 - Ea / (kB T).

Units: positions in Angstrom, time in fs; 1 A^2/fs = 0.1 cm^2/s, 1 A^2/ps = 1e-4 cm^2/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KB_EV = 8.617333262e-5  # eV/K
A2_PER_FS_TO_CM2_PER_S = 0.1

AXES = {"x": [0], "y": [1], "z": [2], "xy": [0, 1], "xz": [0, 2], "yz": [1, 2], "xyz": [0, 1, 2]}


def unwrap(scaled_positions: np.ndarray, cells: np.ndarray, pbc=(True, True, True)) -> np.ndarray:
    """Unwrapped Cartesian positions [T,N,3] from wrapped fractional ones [T,N,3] and cells [T,3,3].

    Frame-to-frame fractional jumps along the periodic directions (``pbc``) are taken as the
    minimum image (valid while no atom moves more than half a cell between saved frames); open
    directions are left as they are. The cells must be complete (a molecule or a sheet without a
    c vector: ASE's ``cell.complete()``, whose stand-in vectors make fractional = Cartesian there).
    """
    s = np.asarray(scaled_positions, dtype=float)
    cells = np.broadcast_to(np.asarray(cells, dtype=float), (len(s), 3, 3))
    ds = np.diff(s, axis=0)
    ds -= np.round(ds) * np.asarray(pbc, dtype=bool)
    s_unwrapped = np.concatenate([s[:1], s[:1] + np.cumsum(ds, axis=0)], axis=0)
    return np.einsum("tni,tij->tnj", s_unwrapped, cells)


def msd(positions: np.ndarray, atoms: np.ndarray | None = None, axes="xy", max_lag: int | None = None,
        origin_stride: int = 1, drift_atoms: np.ndarray | None = None) -> np.ndarray:
    """Mean-squared displacement [lag] of ``atoms`` (indices) along ``axes``, summed over axes.

    positions: unwrapped [T,N,3]. Averages over atoms and time origins t0 = 0, stride, 2 stride...
    The displacement of the centre of mass of ``drift_atoms`` (default: all atoms, equal weights)
    is subtracted frame by frame. Set ``drift_atoms=[]`` to keep the drift.
    """
    pos = np.asarray(positions, dtype=float)
    T = pos.shape[0]
    ax = AXES[axes] if isinstance(axes, str) else list(axes)
    if drift_atoms is None:
        drift = pos.mean(axis=1, keepdims=True)
    elif len(drift_atoms) == 0:
        drift = np.zeros((T, 1, 3))
    else:
        drift = pos[:, np.asarray(drift_atoms)].mean(axis=1, keepdims=True)
    rel = pos - (drift - drift[:1])
    sel = rel[:, atoms][:, :, ax] if atoms is not None else rel[:, :, ax]
    max_lag = T - 1 if max_lag is None else min(max_lag, T - 1)
    out = np.zeros(max_lag + 1)
    for lag in range(1, max_lag + 1):
        origins = np.arange(0, T - lag, origin_stride)
        d = sel[origins + lag] - sel[origins]
        out[lag] = (d ** 2).sum(-1).mean()
    return out


@dataclass
class DiffusionResult:
    D: float  # A^2/fs
    D_err: float  # A^2/fs (standard error over blocks; nan with one block)
    dims: int
    fit_start_fs: float
    fit_end_fs: float

    @property
    def D_cm2_s(self) -> float:
        return self.D * A2_PER_FS_TO_CM2_PER_S

    @property
    def D_err_cm2_s(self) -> float:
        return self.D_err * A2_PER_FS_TO_CM2_PER_S


def fit_slope(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares line y = a t + b; returns (a, b)."""
    A = np.vstack([t, np.ones_like(t)]).T
    a, b = np.linalg.lstsq(A, y, rcond=None)[0]
    return float(a), float(b)


def diffusion_coefficient(positions: np.ndarray, timestep_fs: float, atoms=None, axes="xy",
                          fit_start: float = 0.2, fit_end: float = 0.8, origin_stride: int = 1,
                          blocks: int = 1, drift_atoms=None) -> DiffusionResult:
    """Einstein-relation D from unwrapped positions [T,N,3] saved every ``timestep_fs``.

    The linear fit uses lags in [fit_start, fit_end] x the maximum lag (skipping the ballistic
    start and the noisy tail). With ``blocks`` > 1 the trajectory is cut into that many blocks,
    D is their mean and D_err the standard error of the mean.
    """
    pos = np.asarray(positions, dtype=float)
    ax = AXES[axes] if isinstance(axes, str) else list(axes)
    d = len(ax)
    T = pos.shape[0]
    L = T // blocks
    if L < 4:
        raise ValueError("trajectory too short for the requested number of blocks")
    values = []
    t0 = t1 = 0.0
    for b in range(blocks):
        seg = pos[b * L:(b + 1) * L]
        m = msd(seg, atoms, ax, origin_stride=origin_stride, drift_atoms=drift_atoms)
        lags = np.arange(len(m))
        lo = max(int(round(fit_start * (len(m) - 1))), 1)
        hi = max(int(round(fit_end * (len(m) - 1))), lo + 1)
        slope, _ = fit_slope(lags[lo:hi + 1] * timestep_fs, m[lo:hi + 1])
        values.append(slope / (2 * d))
        t0, t1 = lo * timestep_fs, hi * timestep_fs
    values = np.asarray(values)
    err = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return DiffusionResult(float(values.mean()), err, d, t0, t1)


@dataclass
class ArrheniusFit:
    D0: float  # same units as the input D
    Ea: float  # eV
    Ea_err: float
    cov: np.ndarray | None = None  # covariance of (slope, intercept) of ln D vs 1/(kB T)

    def D(self, T: float) -> float:
        return self.D0 * np.exp(-self.Ea / (KB_EV * T))

    def D_err(self, T: float) -> float:
        """Standard error of D(T) from the fit's covariance (first order in ln D); NaN without one."""
        if self.cov is None:
            return float("nan")
        g = np.array([1.0 / (KB_EV * T), 1.0])
        return float(self.D(T) * np.sqrt(g @ self.cov @ g))


def arrhenius_fit(temperatures, diffusivities, errors=None) -> ArrheniusFit:
    """Weighted least squares of ln D = ln D0 - Ea / (kB T).

    With ``errors`` (standard errors of D, e.g. from blocks) the points are weighted by
    (D / err)^2 and the covariance is the absolute one, (A^T W A)^-1, as for measured errors
    (any number of temperatures >= 2). Without errors, or unless every one is finite and positive
    (e.g. NaN from a single block), the points weigh equally and the covariance is scaled by the
    residual variance (needs >= 3 temperatures).
    """
    T = np.asarray(temperatures, dtype=float)
    D = np.asarray(diffusivities, dtype=float)
    if np.any(D <= 0):
        raise ValueError("Arrhenius fit needs positive diffusivities")
    x = 1.0 / (KB_EV * T)
    y = np.log(D)
    w = np.ones_like(y)
    rel = None if errors is None else np.asarray(errors, dtype=float) / D
    measured = rel is not None and bool(np.all(np.isfinite(rel) & (rel > 0)))
    if measured:
        w = 1.0 / rel ** 2
    A = np.vstack([x, np.ones_like(x)]).T * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(A, y * np.sqrt(w), rcond=None)
    slope, intercept = coef
    cov = None
    if measured:
        cov = np.linalg.inv(A.T @ A)
    elif len(T) > 2:
        resid = y - (slope * x + intercept)
        cov = (w * resid ** 2).sum() / (len(T) - 2) * np.linalg.inv(A.T @ A)
    err = float(np.sqrt(cov[0, 0])) if cov is not None else float("nan")
    return ArrheniusFit(float(np.exp(intercept)), float(-slope), err, cov)
