"""The FFT mean-squared displacement (nMoldyn's algorithm) against the direct O(T^2) average."""

import numpy as np
import pytest

from tub_mlff.diffusion import AXES, diffusion_coefficient, msd


def _direct_msd(pos, atoms=None, axes="xy", origin_stride=1, drift_atoms=None):
    """Textbook MSD: for every lag, the mean over atoms and every origin t0 = 0, s, 2s, ... with
    t0 + lag < T of the squared displacement summed over ``axes``, after subtracting the drift
    (mean displacement of ``drift_atoms``; all atoms when None, none when empty)."""
    pos = np.asarray(pos, dtype=float)
    T = len(pos)
    if drift_atoms is None:
        drift = pos.mean(axis=1, keepdims=True)
    elif len(drift_atoms) == 0:
        drift = np.zeros((T, 1, 3))
    else:
        drift = pos[:, list(drift_atoms)].mean(axis=1, keepdims=True)
    rel = pos - (drift - drift[:1])
    x = rel[:, atoms] if atoms is not None else rel
    x = x[:, :, AXES[axes]]
    out = np.zeros(T)
    for lag in range(1, T):
        origins = np.arange(0, T - lag, origin_stride)
        d = x[origins + lag] - x[origins]  # [origins, atoms, axes]
        out[lag] = (d ** 2).sum(axis=-1).mean()
    return out


def _walk(T, n_atoms, seed, offset=20.0, drift=0.0):
    rng = np.random.default_rng(seed)
    steps = rng.normal(scale=0.3, size=(T - 1, n_atoms, 3))
    pos = np.concatenate([np.zeros((1, n_atoms, 3)), np.cumsum(steps, axis=0)])
    pos += rng.uniform(-offset, offset, size=(1, n_atoms, 3))  # atoms far from the origin
    return pos + drift * np.arange(T)[:, None, None]


@pytest.mark.parametrize("T", [2, 5, 64, 97, 200, 331])  # odd, prime and even lengths
@pytest.mark.parametrize("axes", ["xy", "xyz", "z"])
def test_fft_msd_equals_the_direct_average_one_atom(T, axes):
    pos = _walk(T, 1, seed=T)
    ref = _direct_msd(pos, axes=axes, drift_atoms=[])
    got = msd(pos, axes=axes, drift_atoms=[])
    assert got.shape == ref.shape == (T,)
    assert got[0] == 0.0
    np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-10, atol=0)


@pytest.mark.parametrize("T", [3, 50, 101, 256, 401])
@pytest.mark.parametrize("axes", ["xy", "xyz", "x"])
@pytest.mark.parametrize("drift", ["all", "host", "none"])
def test_fft_msd_equals_the_direct_average_many_atoms(T, axes, drift):
    """Atom selection, axis selection and drift removal (all atoms, a host group, none)."""
    pos = _walk(T, 12, seed=1000 + T, drift=0.02)
    pos[:, :4] *= 0.1  # a slow "host"
    atoms = np.arange(4, 12)
    drift_atoms = {"all": None, "host": np.arange(4), "none": []}[drift]
    ref = _direct_msd(pos, atoms, axes, drift_atoms=drift_atoms)
    got = msd(pos, atoms, axes, drift_atoms=drift_atoms)
    np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-10, atol=0)
    every = msd(pos, None, axes, drift_atoms=drift_atoms)  # all atoms, no selection
    np.testing.assert_allclose(every[1:], _direct_msd(pos, None, axes, drift_atoms=drift_atoms)[1:], rtol=1e-10, atol=0)


@pytest.mark.parametrize("stride", [2, 3, 7, 40, 10**9])
def test_fft_msd_with_strided_origins_equals_the_direct_average(stride):
    pos = _walk(223, 5, seed=stride % 1000)
    ref = _direct_msd(pos, [0, 2, 3], "xyz", origin_stride=stride, drift_atoms=[1])
    got = msd(pos, [0, 2, 3], "xyz", origin_stride=stride, drift_atoms=[1])
    np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-10, atol=0)


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("T", [97, 400, 1009])
def test_fft_alone_is_accurate(monkeypatch, T, stride):
    """The FFT sums themselves, without the direct re-summing of ill-conditioned lags."""
    import tub_mlff.diffusion as diffusion

    monkeypatch.setattr(diffusion, "_DIRECT_LAGS", 0)
    pos = _walk(T, 6, seed=T + stride, drift=0.01)
    for axes in ("xy", "xyz"):
        ref = _direct_msd(pos, [1, 2, 5], axes, origin_stride=stride, drift_atoms=[0, 3])
        got = msd(pos, [1, 2, 5], axes, origin_stride=stride, drift_atoms=[0, 3])
        np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-10, atol=0)


def test_long_walk_msd_matches_the_direct_average_at_every_kind_of_lag():
    """60 000 frames: the shortest lags (largest cancellation in S1 - 2 S2) and the last ones
    (few origins) still agree with the direct average over all origins."""
    T = 60_000
    pos = _walk(T, 2, seed=99)
    got = msd(pos, axes="xy", drift_atoms=[])
    x = pos[:, :, :2]
    for lag in np.unique(np.r_[1:40, np.linspace(40, T - 40, 60).astype(int), T - 40:T]):
        d = x[lag:] - x[:-lag]
        assert got[lag] == pytest.approx((d ** 2).sum(-1).mean(), rel=1e-10, abs=0)


def test_fft_msd_max_lag_truncates():
    pos = _walk(150, 3, seed=7)
    full = msd(pos, axes="xyz")
    np.testing.assert_array_equal(msd(pos, axes="xyz", max_lag=40), full[:41])
    np.testing.assert_array_equal(msd(pos, axes="xyz", max_lag=10**6), full)


def test_ballistic_particle_msd_is_exact():
    """x(t) = v t: every origin gives the displacement v m dt, so MSD(m) = |v m dt|^2 exactly."""
    T, dt = 1001, 2.0
    v = np.array([0.013, -0.007, 0.02])
    t = np.arange(T) * dt
    pos = (t[:, None] * v)[:, None, :] + np.array([3.0, -4.0, 7.5])  # one atom, off the origin
    lags = np.arange(T)
    for axes in ("xyz", "xy", "z"):
        expect = (lags * dt) ** 2 * (v[AXES[axes]] ** 2).sum()
        got = msd(pos, axes=axes, drift_atoms=[])
        np.testing.assert_allclose(got[1:], expect[1:], rtol=1e-9, atol=0)


def test_random_walk_gives_the_step_variance_D():
    """Gaussian steps of variance 2 D dt per axis: MSD(m) = 2 d D m dt, here in 2-D and 3-D.
    3200 walkers x 1000 steps in 4 blocks: over seeds the estimate scatters by ~1 % (and D_err is
    ~1 %); the tolerance is 6 %, so the check cannot fail by accident."""
    D, dt = 0.04, 5.0
    rng = np.random.default_rng(12345)
    steps = rng.normal(scale=np.sqrt(2 * D * dt), size=(1000, 3200, 3))
    pos = np.concatenate([np.zeros((1, 3200, 3)), np.cumsum(steps, axis=0)])
    for axes in ("xy", "xyz"):
        res = diffusion_coefficient(pos, dt, axes=axes, blocks=4, drift_atoms=[])
        assert res.D == pytest.approx(D, rel=0.06)
        assert res.dims == len(axes)
        assert 0 < res.D_err < 0.04 * D
