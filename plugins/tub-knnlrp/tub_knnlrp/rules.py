"""LRP rules for the neuralized networks, summed over all detection units in closed form.

Bley et al., arXiv:2508.03913 (2025), Supplementary Note E. Each detection unit
h_ij(x) = 2(x_i − x_j)ᵀ(x − m_ij) + const is linear; a pair (i, j) carries pooling weight p⁺_i p⁻_j.

* **GI** (gradient × input, reference point 0): R_d = x_d · 2(Σ_i p⁺_i x_id − Σ_j p⁻_j x_jd), the
  virtual support vector counted at x. Equals x ⊙ ∇_x(Σp⁻z⁻ − Σp⁺z⁺) with p held fixed.
* **midpoint** (reference point m_ij for each unit, exact on each unit up to its bias):
  R_d = Σ_j p⁻_j (x_d − x_jd)² − Σ_i p⁺_i (x_d − x_id)²; the virtual SV contributes 0.
* **hybrid**: (1 − η)·R^GI + η·R^mid.

Relevances are in squared-distance units (not multiplied by γ), as in the authors' code.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from tub_knnlrp.networks import PooledMoments

RULES = ("gi", "midpoint", "hybrid")


def is_real(value) -> bool:
    """A finite real number, not a bool (numpy scalars included): for user-given and stored parameters."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value))

def normalize_rule(rule: str) -> str:
    r = str(rule).lower().replace("-", "").replace("_", "")
    aliases = {"gi": "gi", "gradientxinput": "gi", "midpoint": "midpoint", "mid": "midpoint", "hybrid": "hybrid"}
    if r not in aliases:
        raise ValueError(f"unknown rule {rule!r}; use one of gi, midpoint, hybrid")
    return aliases[r]


def gi_relevance(X: np.ndarray, m: PooledMoments) -> np.ndarray:
    """R^GI = x ⊙ 2(mean⁺ − mean⁻)."""
    return X * 2.0 * (m.mean_pos - m.mean_neg)


def midpoint_relevance(m: PooledMoments) -> np.ndarray:
    """R^mid = Σp⁻(x − x_j)² − Σp⁺(x − x_i)² per feature."""
    return m.sqdiff_neg - m.sqdiff_pos


def relevance(X: np.ndarray, m: PooledMoments, rule: str = "hybrid", eta: float = 0.8) -> np.ndarray:
    """Relevance (n, d) for one of the rules; ``eta`` is used by the hybrid rule only."""
    rule = normalize_rule(rule)
    if rule == "gi":
        return gi_relevance(X, m)
    if rule == "midpoint":
        return midpoint_relevance(m)
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    return (1.0 - eta) * gi_relevance(X, m) + eta * midpoint_relevance(m)


def eta_svm(gamma: float, median_sqdist: float = 1.0) -> float:
    """The published η heuristic for the SVM (§2.2), evaluated at γ·m.

    With data scaled so that the median pairwise squared distance m is 1 and ℓ = log₁₀ γ:
    η = 0 if ℓ < −0.5, 1 if ℓ > 1.5, else round(0.4ℓ + 0.4, 2). It jumps from 0 to 0.2 at
    ℓ = −0.5, as published. For unscaled data we evaluate it at γ·m (our reading). With m = 0 (most
    training rows identical) it is undefined: a ValueError asks for an explicit η.
    """
    scale = float(gamma) * float(median_sqdist)
    if not scale > 0:
        raise ValueError("the SVM's eta heuristic needs distinct training rows (their median pairwise squared "
                         "distance is 0); pass eta explicitly")
    ell = math.log10(scale)
    if ell < -0.5:
        return 0.0
    if ell > 1.5:
        return 1.0
    return round(ell * 0.4 + 0.4, 2)


ETA_KNN = 0.8
"""The paper's fixed η for the kNN."""


def median_pairwise_sqdist(X: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """Median squared Euclidean distance over distinct pairs (a seeded subset above max_rows)."""
    from scipy.spatial.distance import pdist

    X = np.asarray(X, dtype=np.float64)
    if len(X) > max_rows:
        X = X[np.random.default_rng(seed).choice(len(X), max_rows, replace=False)]
    if len(X) < 2:
        return 1.0
    return float(np.median(pdist(X, "sqeuclidean")))
