"""Tracer diffusion from MD: unwrapped mean-squared displacement and the Einstein relation.

D = lim_{t->inf} MSD(t) / (2 d t) for d Cartesian axes (d = 2, x and y, for in-plane motion in a
layered host). MSD is averaged over atoms and over several time origins; the drift (mean
displacement) of a reference group is removed: all atoms by default here, the host framework
(every other element) in ``tub mlff diffusion``, as pymatgen's DiffusionAnalyzer does, so that a
few fast ions in a small cell do not drag the reference along; the fit skips the early (ballistic)
part. Error bars come from fitting the MSD of independent blocks of the trajectory. Temperature
dependence: Arrhenius, ln D = ln D0 - Ea / (kB T).

``ase_diffusion_coefficient`` is the other estimator, ASE's ``DiffusionCoefficient``: one time
origin per segment (its first frame), no drift removal, and a straight-line fit over the whole
segment from lag 0, ballistic start included. On the same frames it gives the same D as ASE to
rounding; it differs from the estimator above by the statistics of one origin (noisier), by any
drift of the centre of mass, and by the fit window (the short-time ballistic part and the long
lags that only the few early origins reach weigh in), typically by a few to tens of per cent on
a short run.

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


_FEW_ORIGINS = 16  # up to this many time origins the direct sum is cheaper than the FFT
_REL_TOL = 1e-11  # lags whose FFT sum may be off by more than this (relative) are summed directly
_DIRECT_LAGS = 64  # ... within this many full lags (T x columns) of extra work


def _msd_sum(x: np.ndarray, origin_stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sum over origins and columns of squared displacements, and the number of origins, per lag.

    x: [T, K] (one column per atom and axis). For lag m the origins are t0 = 0, s, 2s, ... with
    t0 + m <= T - 1 (s = ``origin_stride``); returns (sum_{t0,k} (x_k(t0+m) - x_k(t0))^2, n_origins(m))
    for m = 0 .. T-1.

    The FFT algorithm of nMoldyn (Calandrini, Pellegrini, Calligari, Hinsen and Kneller, "nMoldyn -
    Interfacing spectroscopic experiments, molecular dynamics simulations and models for time
    correlation functions", Collection SFN 12, 201-232 (2011); also ``tidynamics.msd``), written here
    from the formula and extended to strided origins: expanding the square,

        sum_{t0} |x(t0+m) - x(t0)|^2 = S1(m) - 2 S2(m),
        S1(m) = sum_{t0} |x(t0)|^2 + sum_{t0} |x(t0+m)|^2,   S2(m) = sum_{t0} x(t0) . x(t0+m).

    S1 comes from running sums of q(t) = |x(t)|^2 (the first term a prefix sum of q over the
    origins, the second a suffix sum of q over the frames t = m mod s from m on). S2 is the
    correlation of the origin-masked positions with the positions, computed with real FFTs of
    length >= 2T (zero padding, so no periodic wrap-around): O(T log T) per column instead of
    the O(T^2) loop over lags. With at most ``_FEW_ORIGINS`` origins (e.g. a single one) the
    direct sum over origins is cheaper and is used instead.

    Accuracy: each column's mean is subtracted first (displacements do not change) to keep the
    cancellation in S1 - 2 S2 small, and the lags where that cancellation could still cost more
    than ``_REL_TOL`` relative are summed directly (``_lag_sums``); the result equals the direct
    average over origins to float rounding (~1e-12 relative) at every lag.
    """
    from scipy import fft as sfft

    x = np.asarray(x, dtype=float)
    T, K = x.shape
    if int(origin_stride) < 1:
        raise ValueError(f"origin_stride must be >= 1, got {origin_stride}")
    s = min(int(origin_stride), max(T, 1))  # a stride >= T leaves the one origin t0 = 0
    lags = np.arange(T)
    last_origin = T - 1 - lags  # origins t0 <= T-1-m
    n_orig = last_origin // s + 1
    if K == 0:
        return np.zeros(T), n_orig
    if n_orig[0] <= _FEW_ORIGINS:  # a few origins (e.g. one): sum them directly, O(T) each
        total = np.zeros(T)
        for t0 in range(0, T, s):
            d = x[t0:] - x[t0]
            total[:T - t0] += np.einsum("tk,tk->t", d, d)
        return total, n_orig
    x = x - x.mean(axis=0)
    q = np.einsum("tk,tk->t", x, x)
    origin = np.zeros(T, dtype=bool)
    origin[::s] = True
    # sum_{t0 in origins, t0 <= T-1-m} q(t0): prefix sum over the origins
    first = np.cumsum(np.where(origin, q, 0.0))[last_origin]
    # sum_{t0 in origins, t0 <= T-1-m} q(t0 + m) = sum of q(t) for t >= m, t = m (mod s)
    rows = -(-T // s)
    qs = np.zeros(rows * s)
    qs[:T] = q
    second = np.cumsum(qs.reshape(rows, s)[::-1], axis=0)[::-1].ravel()[:T]
    # S2(m) = sum_{t0 in origins} x(t0) . x(t0+m): cross-correlation by FFT, zero-padded to >= 2T
    nfft = sfft.next_fast_len(2 * T, real=True)
    s2 = np.zeros(T)
    chunk = max(1, (1 << 22) // nfft)  # columns per pass: bounds the spectra to ~100 MB
    for c in range(0, K, chunk):
        xc = x[:, c:c + chunk]
        fx = sfft.rfft(xc, n=nfft, axis=0)
        fo = fx if s == 1 else sfft.rfft(np.where(origin[:, None], xc, 0.0), n=nfft, axis=0)
        s2 += sfft.irfft((np.conj(fo) * fx).sum(axis=1), n=nfft)[:T]
    total = first + second - 2.0 * s2
    total[0] = 0.0
    # Rounding: |error| <~ eps sqrt(T) sum_t q(t) at every lag (measured <= 0.5x that up to T = 2.6e5),
    # so lags whose sum is small next to it (the shortest lags of a long random walk; a tail lag
    # where the displacement happens to be ~0) are summed directly, smallest first, within a budget
    # of ~64 full lags of work: every lag then matches the direct average to ~1e-11 relative.
    bound = 2.0 * np.finfo(float).eps * np.sqrt(T) * q.sum()
    bad = np.flatnonzero(total[1:] * _REL_TOL < bound) + 1
    if len(bad):
        bad = bad[np.argsort(total[bad], kind="stable")]
        bad = bad[np.cumsum(n_orig[bad]) <= _DIRECT_LAGS * T]
        total[bad] = _lag_sums(x, bad, s)
    return np.maximum(total, 0.0), n_orig


def _lag_sums(x: np.ndarray, lags: np.ndarray, s: int) -> np.ndarray:
    """Direct sums over origins t0 = 0, s, 2s, ... (t0 + m < T) and columns of (x(t0+m) - x(t0))^2
    for each lag m in ``lags``; origins in cache-sized blocks, all lags per block."""
    T, K = x.shape
    out = np.zeros(len(lags))
    step = s * max(1, (1 << 17) // max(K, 1))  # ~1 MB of origins per block
    for t in range(0, T, step):
        for i, m in enumerate(lags):
            hi = min(t + step, T - m)  # origins t0 < T - m
            if hi > t:
                d = x[t + m:hi + m:s] - x[t:hi:s]
                out[i] += np.einsum("tk,tk->", d, d)
    return out


def msd(positions: np.ndarray, atoms: np.ndarray | None = None, axes="xy", max_lag: int | None = None,
        origin_stride: int = 1, drift_atoms: np.ndarray | None = None) -> np.ndarray:
    """Mean-squared displacement [lag] of ``atoms`` (indices) along ``axes``, summed over axes.

    positions: unwrapped [T,N,3]. Averages over atoms and time origins t0 = 0, stride, 2 stride...
    (every origin with t0 + lag in the trajectory) for every lag 0 .. ``max_lag`` (default T-1).
    The displacement of the centre of mass of ``drift_atoms`` (default: all atoms, equal weights)
    is subtracted frame by frame. Set ``drift_atoms=[]`` to keep the drift.

    Computed with the FFT algorithm of nMoldyn (Calandrini et al., Collection SFN 12, 201-232
    (2011); see ``_msd_sum``) in O(T log T); equal to the direct average over origins to rounding.
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
    shift = (drift - drift[:1])[:, :, ax]
    sel = (pos[:, atoms][:, :, ax] if atoms is not None else pos[:, :, ax]) - shift
    max_lag = T - 1 if max_lag is None else min(max_lag, T - 1)
    if max_lag < 1:
        return np.zeros(max_lag + 1)
    n_atoms = sel.shape[1]
    total, n_orig = _msd_sum(sel.reshape(T, -1), origin_stride)
    out = total[:max_lag + 1] / (n_orig[:max_lag + 1] * n_atoms)
    out[0] = 0.0
    return out


@dataclass
class DiffusionResult:
    D: float  # A^2/fs
    D_err: float  # A^2/fs (standard error over blocks; nan with one block)
    dims: int
    fit_start_fs: float
    fit_end_fs: float
    D_std: float = float("nan")  # A^2/fs; ``ase_diffusion_coefficient`` only: ASE's std over segments and axes

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


def diffusive_regime(t: np.ndarray, msd_values: np.ndarray, window: tuple[float, float]) -> tuple[float, float]:
    """(log-log slope of the MSD over the fit window, MSD at its end in A^2): the Einstein relation holds
    where MSD grows linearly (slope 1) and the atoms have left their sites; a slope near 2 is the ballistic
    start (free flight between collisions), where a fitted "D" measures the velocity, not diffusion."""
    t, m = np.asarray(t, float), np.asarray(msd_values, float)
    inside = (t >= window[0]) & (t <= window[1]) & (t > 0) & (m > 0)
    end = float(m[t <= window[1]][-1]) if np.any(t <= window[1]) else float("nan")
    if inside.sum() < 2:
        return float("nan"), end
    return float(np.polyfit(np.log(t[inside]), np.log(m[inside]), 1)[0]), end


def ase_diffusion_coefficient(positions: np.ndarray, timestep_fs: float, atoms=None, axes="xy",
                              segments: int = 1) -> DiffusionResult:
    """D as ASE's ``ase.md.analysis.DiffusionCoefficient`` computes it, from unwrapped positions [T,N,3].

    ASE's estimator (as in ASE 3.29), written here from its formulas: the trajectory is cut into
    ``segments`` consecutive segments of L = T // segments frames (a remainder at the end is
    dropped); in each, the MSD along each axis a is taken from the segment's first frame only (one
    time origin, no drift removal), averaged over the atoms, for every frame of the segment
    including the first (MSD = 0 there); MSD_a / 2 is fitted with a straight line (slope and
    intercept, least squares) against time over the whole segment, ballistic start included. The
    slope is D along a; D is the mean of the slopes over the segments and the chosen ``axes``.
    ``DiffusionCoefficient.get_diffusion_coefficients`` averages over x, y and z; for a 2-D
    estimate take the mean of ``dc.slopes[k][:, :2]`` (x and y), which is what ``axes="xy"`` gives
    here. ASE's slopes are in A^2 per ASE time unit: x ``units.fs`` gives A^2/fs, x 0.1 cm^2/s.

    Returns D and, like ``diffusion_coefficient``, D_err = the standard error of the mean of the
    per-segment D (NaN with one segment); ``D_std`` is ASE's second number, the population standard
    deviation (ddof 0) of the slopes over segments and axes.
    """
    pos = np.asarray(positions, dtype=float)
    ax = AXES[axes] if isinstance(axes, str) else list(axes)
    d = len(ax)
    sel = pos[:, atoms][:, :, ax] if atoms is not None else pos[:, :, ax]
    L = pos.shape[0] // segments
    if L < 2:
        raise ValueError("trajectory too short for the requested number of segments")
    t = np.arange(L) * float(timestep_fs)
    A = np.vstack([t, np.ones_like(t)]).T
    slopes = np.empty((segments, d))
    for k in range(segments):
        seg = sel[k * L:(k + 1) * L]
        msd_axis = ((seg - seg[:1]) ** 2).mean(axis=1)  # [L, d]: one origin, mean over atoms
        slopes[k] = np.linalg.lstsq(A, msd_axis / 2.0, rcond=None)[0][0]
    per_segment = slopes.mean(axis=1)
    err = float(per_segment.std(ddof=1) / np.sqrt(segments)) if segments > 1 else float("nan")
    return DiffusionResult(float(slopes.mean()), err, d, 0.0, (L - 1) * float(timestep_fs),
                           D_std=float(slopes.std()))


@dataclass
class ArrheniusFit:
    D0: float  # same units as the input D
    Ea: float  # eV
    Ea_err: float
    cov: np.ndarray | None = None  # covariance of (slope, intercept) of ln D vs 1/(kB T)

    def D(self, T: float) -> float:
        return self.D0 * np.exp(-self.Ea / (KB_EV * T))

    def lnD_err(self, T: float) -> float:
        """Standard error of ln D(T) from the fit's covariance (the fit is linear in ln D); NaN without one."""
        if self.cov is None:
            return float("nan")
        g = np.array([1.0 / (KB_EV * T), 1.0])
        return float(np.sqrt(g @ self.cov @ g))

    def D_err(self, T: float) -> float:
        """D(T) · σ(ln D): the first-order standard error of D(T); far from the data it can exceed D, where
        :meth:`D_interval` is the meaningful range."""
        return float(self.D(T) * self.lnD_err(T))

    def D_interval(self, T: float) -> tuple[float, float]:
        """D(T) ×/÷ exp(σ(ln D)): the one-standard-error range, which stays positive."""
        f = float(np.exp(self.lnD_err(T)))
        return float(self.D(T) / f), float(self.D(T) * f)


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
    # an error of a billionth of D is blocks identical to rounding (a synthetic run), not a measurement
    measured = rel is not None and bool(np.all(np.isfinite(rel) & (rel > 1e-9)))
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
