"""Isotropic Gaussian KDE for in-painting removed features during feature flipping (spec §2.6).

The bandwidth comes from the leave-one-out fixed point of Barnard's / Kauffmann's KDE
(Pattern Recognition Letters 2012, Eq. 3) as used by the authors' evaluation code:

    d_nm = ‖x_n − x_m‖² (n ≠ m), s₀ = 1/mean(d_nm)
    repeat: w_nm = softmax_{m≠n}(−s d_nm), σ² = Σ_nm w_nm d_nm / (N·D), s = 1/(2σ²)
    until the LOO log-likelihood Σ_n [LSE_{m≠n}(−s d_nm) − log(N−1) + (D/2) log(s/π)] moves ≤ 1e-6.

Conditional sampling given kept features K: component weights π_n ∝ exp(−s‖x_K − x_{n,K}‖²),
n ~ π, removed features = x_{n,removed} + N(0, 1/(2s)).

Unlike the reference, the training subset is drawn with a seeded ``numpy.random.Generator`` and
index arrays: no global seed is set and the caller's array is never modified.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from tubcli.errors import TubError

from tub_knnlrp.networks import squared_distances


class GaussianKDE:
    def __init__(self, max_points: int = 5000, tol: float = 1e-6, max_iter: int = 500, seed: int = 0):
        self.max_points = max_points
        self.tol = tol
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, X):
        X = np.asarray(X, dtype=np.float64)
        if len(X) < 3:
            raise ValueError("the KDE needs at least 3 training rows")
        rng = np.random.default_rng(self.seed)
        if len(X) > self.max_points:
            X = X[rng.choice(len(X), self.max_points, replace=False)]
        self.points_ = X.copy()
        N, D = X.shape
        d = squared_distances(X, X)  # the one N x N matrix; the iterations work on blocks of its rows
        np.fill_diagonal(d, 0.0)
        mean = d.sum() / (N * (N - 1))
        self._refuse_collapse(X, mean)
        s = 1.0 / mean
        loss, sigma2 = self._loo_and_variance(d, s, D)
        for it in range(self.max_iter):
            self._refuse_collapse(X, sigma2)
            s = 1.0 / (2.0 * sigma2)
            old, (loss, sigma2) = loss, self._loo_and_variance(d, s, D)
            if abs(loss - old) <= self.tol:
                break
        self.scale_ = s
        self.n_iter_ = it + 1
        self.loo_loglik_ = loss
        return self

    @staticmethod
    def _refuse_collapse(X, variance) -> None:
        """Rows that repeat exactly pull the LOO bandwidth to 0 (each one's nearest neighbour is itself):
        the fixed point would be NaN, and the in-painted samples copies."""
        if not (np.isfinite(variance) and variance > 0):
            repeats = len(X) - len(np.unique(X, axis=0))
            raise TubError(f"the KDE's bandwidth collapses to 0: {repeats} of its {len(X)} training rows repeat "
                           "another exactly; drop the duplicate rows or flip with --replacement mean")

    @staticmethod
    def _loo_and_variance(d, s, D, cells: int = 2 ** 23):
        """At scale s, over m != n: the LOO log-likelihood Σ_n [LSE_m(−s d_nm) − log(N−1) + (D/2) log(s/π)]
        and the next variance Σ_nm w_nm d_nm / (N·D) with w_n = softmax_m(−s d_nm); ``d`` is the N x N
        matrix (its diagonal left out here), taken in blocks of rows of about ``cells`` values, so that the
        memory stays near one N x N matrix (eight of them at 5000 points before: 1.6 GB)."""
        N = d.shape[0]
        lse_sum = weighted = 0.0
        step = max(1, cells // N)
        for a in range(0, N, step):
            rows = np.arange(a, min(N, a + step))
            logits = d[rows] * -s
            logits[np.arange(len(rows)), rows] = -np.inf  # m = n is left out
            lse = logsumexp(logits, axis=1)
            logits -= lse[:, None]
            np.exp(logits, out=logits)  # the weights w_nm
            lse_sum += lse.sum()
            weighted += np.einsum("ij,ij->", logits, d[rows])
        loss = float(lse_sum - N * np.log(N - 1) + N * 0.5 * D * np.log(s / np.pi))
        return loss, weighted / (N * D)

    def sample_removed(self, x, removed_sets, n_samples: int, rng) -> np.ndarray:
        """Conditional samples for one row ``x`` and a list of boolean masks of removed features.

        Returns (len(removed_sets), n_samples, d): x with its removed features in-painted.
        """
        X = self.points_
        sq = (X - x[None, :]) ** 2  # (N, d)
        out = np.empty((len(removed_sets), n_samples, len(x)))
        noise_sd = (2.0 * self.scale_) ** -0.5
        for t, removed in enumerate(removed_sets):
            kept = ~removed
            logits = -self.scale_ * sq[:, kept].sum(axis=1)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            comp = rng.choice(len(X), size=n_samples, p=p)
            sample = np.broadcast_to(x, (n_samples, len(x))).copy()
            r = np.flatnonzero(removed)
            sample[:, r] = X[comp][:, r] + rng.normal(0.0, noise_sd, size=(n_samples, len(r)))
            out[t] = sample
        return out
