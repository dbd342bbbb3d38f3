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
from scipy.special import logsumexp, softmax

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
        d = squared_distances(X, X)
        d = d[~np.eye(N, dtype=bool)].reshape(N, N - 1)
        s = 1.0 / d.mean()
        loss = self._loo(d, s, D)
        for it in range(self.max_iter):
            w = softmax(-s * d, axis=1)
            sigma2 = (w * d).sum() / (N * D)
            s = 1.0 / (2.0 * sigma2)
            old, loss = loss, self._loo(d, s, D)
            if abs(loss - old) <= self.tol:
                break
        self.scale_ = s
        self.n_iter_ = it + 1
        self.loo_loglik_ = loss
        return self

    @staticmethod
    def _loo(d, s, D):
        """Σ_n [LSE_{m≠n}(−s d_nm) − log(N−1) + (D/2) log(s/π)]; d is the (N, N−1) LOO matrix."""
        N = d.shape[0]
        return float(np.sum(logsumexp(-s * d, axis=1) - np.log(N - 1) + 0.5 * D * np.log(s / np.pi)))

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
