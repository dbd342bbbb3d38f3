"""The hidden neural networks of a binary RBF-SVM and a binary kNN classifier.

Bley, Kauffmann, Krug, Müller, Montavon, *Fast and Accurate Explanations of Distance-Based
Classifiers by Uncovering Latent Explanatory Structures*, arXiv:2508.03913 (2025).

Both classifiers are rewritten *exactly* as a two-layer network: linear "detection units"
h_ij(x) = z_j(x) − z_i(x), one per pair of a positive point i and a negative point j (a hyperplane
through their midpoint), followed by max-pooling over i and min-pooling over j. The pooling is
soft (log-sum-exp with stiffness γ) for the SVM and an order statistic for the kNN. A network
here holds the class points as plain arrays, so it needs neither the fitted scikit-learn object
nor pickle; :mod:`tub_knnlrp.neuralize` builds networks from fitted estimators.

Every quantity is computed independently per input row, so the networks process the rows in blocks
(:func:`rows_per_block`): the (rows × class points) distance, index and pooling matrices exist only
for one block at a time (about :data:`BLOCK_BYTES`), whatever the number of rows explained. Blocking
leaves the kNN bit-for-bit unchanged (per-row distances, neighbour selection and reductions) and the SVM's
g too; the SVM's pooled moments go through matrix products whose last-bit rounding may depend on a
block's row count (≤ 1e-12 relative; see ``tests/knnlrp/test_knnlrp_blocks.py``).

A network returns, for each input row, its output ``g`` and its *pooled moments*:

* ``mean_pos``/``mean_neg``: Σ_i p_i x_i (+ p_b x for the virtual support vector), the pooled
  class point that the GI rule uses;
* ``sqdiff_pos``/``sqdiff_neg``: Σ_i p_i (x − x_i)² per feature (the virtual SV contributes 0),
  which the midpoint rule uses.

:mod:`tub_knnlrp.rules` turns moments into relevances. All arrays are float64, (n, d) row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, softmax


BLOCK_BYTES = 256 * 2**20
"""Memory budget for the per-block (rows × class points) work arrays of one network call."""

BLOCK_ROWS: int | None = None
"""Fixed rows per block, overriding :data:`BLOCK_BYTES` (None: from the budget). For tests."""


def rows_per_block(n_points: int, arrays: int) -> int:
    """Rows per block so that ``arrays`` float64/int64 matrices of (rows × n_points) fit in BLOCK_BYTES."""
    if BLOCK_ROWS is not None:
        return max(1, int(BLOCK_ROWS))
    return max(1, int(BLOCK_BYTES // (max(1, int(n_points)) * 8 * max(1, int(arrays)))))


def row_blocks(n: int, rows: int):
    """Consecutive row slices of at most ``rows`` rows covering 0 … n − 1."""
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def squared_distances(X: np.ndarray, P: np.ndarray) -> np.ndarray:
    """‖x − p‖² for every row pair, computed from differences (no ‖x‖² − 2xp + ‖p‖² cancellation).

    Chunked over rows so memory stays at about 32 MB whatever the sizes.
    """
    n, d = X.shape
    out = np.empty((n, len(P)))
    step = max(1, int(4e6 // max(1, len(P) * d)))
    for s in range(0, n, step):
        diff = X[s : s + step, None, :] - P[None, :, :]
        out[s : s + step] = np.einsum("nmd,nmd->nm", diff, diff)
    return out


@dataclass
class PooledMoments:
    """What the relevance rules need from a network, per input row (all shapes (n, d) or (n,))."""

    output: np.ndarray
    mean_pos: np.ndarray
    mean_neg: np.ndarray
    sqdiff_pos: np.ndarray
    sqdiff_neg: np.ndarray


class NeuralizedSVM:
    """A binary RBF-SVM f(x) = Σ_i α_i k(x, x_i) − Σ_j α_j k(x, x_j) + b as a network (§2.2).

    Parameters
    ----------
    points_pos, points_neg : support vectors with positive / negative dual coefficient, (m±, d)
    alpha_pos, alpha_neg : |dual coefficients| (> 0), (m±,)
    gamma : the fitted numeric RBF γ
    intercept : b
    with_intercept : add b as a *virtual support vector* with constant z_b = −log(|b| + 1e-10)/γ
        on the side of sign(b) (b ≥ 0: positive side, as in the authors' code). Then
        sign(g) = sign(f) exactly.

    Units: z_i = ‖x − x_i‖² − log(α_i)/γ; output g = LSE_i(−γ z_i) − LSE_j(−γ z_j) = log(f⁺/f⁻).
    Pooling weights p± = softmax(−β z±), stiffness β (default γ).
    """

    kind = "svm"

    def __init__(self, points_pos, points_neg, alpha_pos, alpha_neg, gamma, intercept=0.0, with_intercept=True):
        self.points_pos = np.ascontiguousarray(points_pos, dtype=np.float64)
        self.points_neg = np.ascontiguousarray(points_neg, dtype=np.float64)
        self.alpha_pos = np.asarray(alpha_pos, dtype=np.float64)
        self.alpha_neg = np.asarray(alpha_neg, dtype=np.float64)
        self.gamma = float(gamma)
        self.intercept = float(intercept)
        self.with_intercept = bool(with_intercept)
        if len(self.points_pos) == 0 or len(self.points_neg) == 0:
            raise ValueError("the SVM needs support vectors on both sides of the decision function")
        if (self.alpha_pos <= 0).any() or (self.alpha_neg <= 0).any():
            raise ValueError("dual coefficient magnitudes must be > 0")
        if not self.gamma > 0:
            raise ValueError(f"the RBF gamma must be > 0, got {self.gamma}")

    @property
    def n_features(self) -> int:
        return self.points_pos.shape[1]

    @property
    def virtual_side(self) -> int:
        """+1 if the intercept is a virtual positive SV, −1 if negative, 0 if not used."""
        if not self.with_intercept:
            return 0
        return 1 if self.intercept >= 0 else -1

    @property
    def z_intercept(self) -> float:
        """z_b = −log(|b| + 1e-10)/γ, the constant unit of the virtual support vector."""
        return -np.log(abs(self.intercept) + 1e-10) / self.gamma

    def units(self, X):
        """z± (n, m±[+1]): the detection inputs, with the virtual SV as the last column of its side."""
        X = np.asarray(X, dtype=np.float64)
        z_pos = squared_distances(X, self.points_pos) - np.log(self.alpha_pos)[None] / self.gamma
        z_neg = squared_distances(X, self.points_neg) - np.log(self.alpha_neg)[None] / self.gamma
        col = np.full((len(X), 1), self.z_intercept)
        if self.virtual_side > 0:
            z_pos = np.hstack([z_pos, col])
        elif self.virtual_side < 0:
            z_neg = np.hstack([z_neg, col])
        return z_pos, z_neg

    def block_rows(self, arrays: int) -> int:
        """Rows per block for ``arrays`` work matrices of (rows × all units)."""
        return rows_per_block(len(self.points_pos) + len(self.points_neg) + 1, arrays)

    def _output(self, z_pos, z_neg) -> np.ndarray:
        return logsumexp(-self.gamma * z_pos, axis=1) - logsumexp(-self.gamma * z_neg, axis=1)

    def forward(self, X) -> np.ndarray:
        """g(x) = LSE(−γ z⁺) − LSE(−γ z⁻) = log(f⁺(x)/f⁻(x)); sign(g) = sign(f). Row blocks."""
        X = np.asarray(X, dtype=np.float64)
        g = np.empty(len(X))
        for sl in row_blocks(len(X), self.block_rows(4)):
            g[sl] = self._output(*self.units(X[sl]))
        return g

    def decision_function(self, X) -> np.ndarray:
        """f(x) itself, from the stored arrays (equals SVC.decision_function). Row blocks."""
        X = np.asarray(X, dtype=np.float64)
        f = np.empty(len(X))
        for sl in row_blocks(len(X), self.block_rows(3)):
            k_pos = np.exp(-self.gamma * squared_distances(X[sl], self.points_pos))
            k_neg = np.exp(-self.gamma * squared_distances(X[sl], self.points_neg))
            f[sl] = k_pos @ self.alpha_pos - k_neg @ self.alpha_neg + self.intercept
        return f

    def _pool(self, z_pos, z_neg, beta):
        beta = self.gamma if beta is None else float(beta)
        return softmax(-beta * z_pos, axis=1), softmax(-beta * z_neg, axis=1)

    def pooling(self, X, beta=None):
        """p± = softmax(−β z±) including the virtual SV's column (§2.2, 'pooling weights').

        Returns the full (n, m±[+1]) matrices; the explain path uses :meth:`moments`, which pools
        block by block and keeps per-row results only.
        """
        return self._pool(*self.units(X), beta)

    def moments(self, X, beta=None) -> PooledMoments:
        """Pooled class points and squared differences; the virtual SV sits at x itself.

        Rows are processed in blocks; per block the units are computed once and give both the
        output g and the pooling weights.
        """
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        g = np.empty(n)
        res = {side: (np.empty((n, d)), np.empty((n, d))) for side in (1, -1)}
        for sl in row_blocks(n, self.block_rows(6)):
            Xb = X[sl]
            z_pos, z_neg = self.units(Xb)
            g[sl] = self._output(z_pos, z_neg)
            p_pos, p_neg = self._pool(z_pos, z_neg, beta)
            del z_pos, z_neg
            for p, pts, side in ((p_pos, self.points_pos, 1), (p_neg, self.points_neg, -1)):
                m = len(pts)
                p_real = p[:, :m]
                p_virtual = p[:, m] if p.shape[1] > m else np.zeros(len(Xb))
                mean, sq = res[side]
                mean[sl] = p_real @ pts + p_virtual[:, None] * Xb
                # Σ_i p_i (x − x_i)² = (Σ p_i) x² − 2 x Σ p_i x_i + Σ p_i x_i², over the real SVs only
                sq[sl] = (1.0 - p_virtual)[:, None] * Xb**2 - 2.0 * Xb * (p_real @ pts) + p_real @ (pts**2)
        return PooledMoments(g, res[1][0], res[-1][0], res[1][1], res[-1][1])

    def gradient(self, X) -> np.ndarray:
        """∇g(x) = 2γ(Σp⁺x_i + p⁺_b x − Σp⁻x_j − p⁻_b x) with p at β = γ (the true gradient)."""
        m = self.moments(X, beta=self.gamma)
        return 2.0 * self.gamma * (m.mean_pos - m.mean_neg)

    def pooled_offsets(self, X, beta=None):
        """Σp⁻c⁻ − Σp⁺c⁺, c the constant part of each unit (−log α/γ, or z_b for the virtual SV).

        Σ_d R^mid + this = Σp⁻z⁻ − Σp⁺z⁺: what the midpoint rule leaves out (§2.2 identity).
        Row blocks.
        """
        X = np.asarray(X, dtype=np.float64)
        c_pos = -np.log(self.alpha_pos) / self.gamma
        c_neg = -np.log(self.alpha_neg) / self.gamma
        if self.virtual_side > 0:
            c_pos = np.append(c_pos, self.z_intercept)
        elif self.virtual_side < 0:
            c_neg = np.append(c_neg, self.z_intercept)
        out = np.empty(len(X))
        for sl in row_blocks(len(X), self.block_rows(4)):
            p_pos, p_neg = self.pooling(X[sl], beta)
            out[sl] = p_neg @ c_neg - p_pos @ c_pos
        return out

    def to_arrays(self) -> dict:
        return {
            "points_pos": self.points_pos,
            "points_neg": self.points_neg,
            "alpha_pos": self.alpha_pos,
            "alpha_neg": self.alpha_neg,
            "gamma": np.array(self.gamma),
            "intercept": np.array(self.intercept),
        }


class NeuralizedKNN:
    """A binary uniform-vote kNN (odd k) as a network with order-statistic pooling (§2.3).

    With k_d = (k + 1)/2 the vote is positive exactly when the k_d-th nearest positive point is
    closer than the k_d-th nearest negative one. The smoothed output averages the rank window
    r = k_d − κ … k_d + κ:

        g_κ(x) = 1/(2κ+1) Σ_r [d²_(r)(x, neg) − d²_(r)(x, pos)]

    κ = 0 reproduces the vote (ties aside); the default κ = (k − 1)/2 uses ranks 1 … k.
    The pooling weights are 1/(2κ+1) on the selected ranks and 0 elsewhere.
    """

    kind = "knn"

    def __init__(self, points_pos, points_neg, k: int, kappa: int | None = None):
        self.points_pos = np.ascontiguousarray(points_pos, dtype=np.float64)
        self.points_neg = np.ascontiguousarray(points_neg, dtype=np.float64)
        self.k = int(k)
        if self.k < 1 or self.k % 2 == 0:
            raise ValueError(f"the neuralized kNN needs an odd k, got k={self.k}")
        self.kappa = (self.k - 1) // 2 if kappa is None else int(kappa)
        if not 0 <= self.kappa <= (self.k - 1) // 2:
            raise ValueError(f"kappa must be in 0..{(self.k - 1) // 2} for k={self.k}, got {self.kappa}")
        need = self.k_decisive + self.kappa
        for name, pts in (("positive", self.points_pos), ("negative", self.points_neg)):
            if len(pts) < need:
                raise ValueError(
                    f"the {name} class has {len(pts)} training points; k={self.k}, kappa={self.kappa} "
                    f"needs at least {need} per class"
                )

    @property
    def n_features(self) -> int:
        return self.points_pos.shape[1]

    @property
    def k_decisive(self) -> int:
        return (self.k + 1) // 2

    def _window(self, X, pts):
        """Indices and squared distances (n, 2κ+1) of the points at ranks k_d − κ … k_d + κ.

        Selection is per row (``np.argpartition`` along axis 1, then a stable sort of the selected
        distances), so a row's window does not depend on the other rows passed with it: equidistant
        points are resolved the same way whatever the block of rows (checked with exact ties in
        ``tests/knnlrp/test_knnlrp_blocks.py``). :meth:`moments` calls this one row block at a time.
        """
        D = squared_distances(X, pts)
        hi = self.k_decisive + self.kappa  # ranks 1..hi are needed
        if hi < D.shape[1]:
            part = np.argpartition(D, hi - 1, axis=1)[:, :hi].copy()  # copy: free the (rows × points) indices
        else:
            part = np.broadcast_to(np.arange(D.shape[1]), D.shape).copy()
        order = np.argsort(np.take_along_axis(D, part, axis=1), axis=1, kind="stable")
        ranked = np.take_along_axis(part, order, axis=1)[:, self.k_decisive - 1 - self.kappa : hi]
        return ranked, np.take_along_axis(D, ranked, axis=1)

    def moments(self, X, beta=None) -> PooledMoments:
        """Pooled moments over the rank window; ``beta`` is accepted and unused (no soft pooling).

        Rows are processed in blocks (distances, selection, gather and pooling), keeping only the
        per-row results.
        """
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        res = [(np.empty((n, d)), np.empty((n, d)), np.empty(n)) for _ in range(2)]
        # per block: the distance matrix and argpartition's index matrix, (rows × points) each
        rows = rows_per_block(max(len(self.points_pos), len(self.points_neg)), 2)
        for sl in row_blocks(n, rows):
            Xb = X[sl]
            for (mean, sq, dmean), pts in zip(res, (self.points_pos, self.points_neg)):
                idx, dist = self._window(Xb, pts)
                sel = pts[idx]  # (rows, 2κ+1, d)
                diff2 = (Xb[:, None, :] - sel) ** 2
                mean[sl], sq[sl], dmean[sl] = sel.mean(axis=1), diff2.mean(axis=1), dist.mean(axis=1)
        (mean_pos, sq_pos, d_pos), (mean_neg, sq_neg, d_neg) = res
        g = d_neg - d_pos  # g_κ from the order statistics themselves
        return PooledMoments(g, mean_pos, mean_neg, sq_pos, sq_neg)

    def forward(self, X) -> np.ndarray:
        return self.moments(X).output

    def gradient(self, X) -> np.ndarray:
        """∇g_κ(x) = 2(Σp⁺x_i − Σp⁻x_j) on each region of constant neighbour sets."""
        m = self.moments(X)
        return 2.0 * (m.mean_pos - m.mean_neg)

    def to_arrays(self) -> dict:
        return {"points_pos": self.points_pos, "points_neg": self.points_neg, "k": np.array(self.k)}
