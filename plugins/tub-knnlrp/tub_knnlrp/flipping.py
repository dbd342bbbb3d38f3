"""Feature flipping (pixel flipping) and the area under the perturbation curve (spec §2.6).

Bach et al. (2015); Samek et al., IEEE TNNLS 28 (2017). Features are removed most-relevant-first
(sorted by the relevance for the explained class, descending), one per step, always down to the
fully flipped end point. A removed feature takes

* ``"mean"``: the training mean (0 after standardisation), or
* ``"kde"``: KDE in-painting, the score averaged over 50 conditional samples
  (:class:`tub_knnlrp.kde.GaussianKDE`).

The curve is the mean score over rows after t = 0 … m flips; its raw AUPC is the trapezoid on
[0, 1] with step 1/m, the normalised AUPC (the authors' evaluation code) is raw / curve[0].
Lower is better: a faithful explanation destroys the evidence fastest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tub_knnlrp import baselines
from tub_knnlrp.explanation import NeuralizedExplainer
from tub_knnlrp.kde import GaussianKDE
from tub_knnlrp.scores import ClassScore

ETA_SWEEP = [round(0.1 * i, 1) for i in range(11)]
METHODS_COMMON = ["lrp", "gi", "midpoint", "neuralized_ig", "occlusion", "random", "variance", "centroid",
                  "shapley", "kernelshap"]
METHODS_SVM = ["grad_x_input", "ig", "sensitivity"]


def sweep_eta(method: str) -> float | None:
    """η of an η-sweep method name ``lrp_eta<η>``, η a number in [0, 1]; None for any other name."""
    if method.startswith("lrp_eta"):
        try:
            eta = float(method[len("lrp_eta"):])
        except ValueError:
            return None
        if 0.0 <= eta <= 1.0:
            return eta
    return None


def flip_curves(score: ClassScore, Z, c, R, baseline, replacement="mean", kde: GaussianKDE | None = None,
                n_samples: int = 50, seed: int = 0) -> np.ndarray:
    """Per-row curves (n, d + 1): the score after flipping the t most relevant features."""
    n, d = Z.shape
    order = np.argsort(-R, axis=1, kind="stable")
    steps = np.arange(d + 1)
    # removed[r, t, j]: feature j is removed after t flips of row r
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(d), (n, d)), axis=1)
    removed = rank[:, None, :] < steps[None, :, None]  # (n, d+1, d)
    if replacement == "mean":
        curves = np.empty((n, d + 1))
        step = max(1, int(4e6 // ((d + 1) * d)))  # bounded memory for many features
        for s in range(0, n, step):
            r = slice(s, s + step)
            X = np.where(removed[r], baseline[None, None, :], Z[r, None, :]).reshape(-1, d)
            curves[r] = score(X, np.repeat(c[r], d + 1)).reshape(-1, d + 1)
        return curves
    if replacement != "kde":
        raise ValueError(f"replacement must be 'mean' or 'kde', got {replacement!r}")
    if kde is None:
        raise ValueError("KDE in-painting needs a fitted GaussianKDE")
    curves = np.empty((n, d + 1))
    for r in range(n):
        rng = np.random.default_rng([seed, r])
        S = kde.sample_removed(Z[r], list(removed[r]), n_samples, rng)  # (d+1, n_samples, d)
        vals = score(S.reshape(-1, d), np.full(S.shape[0] * S.shape[1], c[r]))
        curves[r] = vals.reshape(d + 1, n_samples).mean(axis=1)
    return curves


def row_aupc(curves: np.ndarray) -> np.ndarray:
    """Raw AUPC of each row's curve (n, m + 1); their mean is the raw AUPC of the mean curve.

    The trapezoid is linear in the curve, so per-row values allow paired comparisons between
    methods on the same rows without changing the reported figure.
    """
    curves = np.asarray(curves, dtype=np.float64)
    m = curves.shape[1] - 1
    return np.sum(curves[:, 1:] + curves[:, :-1], axis=1) / (2.0 * m)


def aupc(curve: np.ndarray, normalise: bool = False) -> float:
    """Trapezoid area of a mean curve over [0, 1] (step 1/m); normalised: divided by curve[0]."""
    curve = np.asarray(curve, dtype=np.float64)
    m = len(curve) - 1
    area = float(np.sum(curve[1:] + curve[:-1]) / (2.0 * m))
    if normalise:
        if curve[0] == 0:
            raise ValueError("cannot normalise a curve that starts at 0")
        area /= float(curve[0])
    return area


@dataclass
class FlippingResult:
    method: str
    curve: np.ndarray
    aupc: float
    aupc_normalised: float
    seconds: float
    extra: dict = field(default_factory=dict)


def shap_problem() -> str | None:
    """Why KernelSHAP cannot run here (None if it can): shap absent, or installed but failing to
    import (e.g. a numba that does not match numpy), which would otherwise abort the whole evaluation."""
    import importlib.util

    if importlib.util.find_spec("shap") is None:
        return "shap is not installed (pip install shap)"
    try:
        import shap  # noqa: F401
    except Exception as exc:  # a broken optional dependency
        return f"shap is installed but does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


class FlippingEvaluation:
    """Compare explanation methods for one fitted kNN/SVC by feature flipping, in model space.

    Parameters
    ----------
    estimator : the fitted KNeighborsClassifier or SVC (the pipeline's last step)
    Z_train, y_train : training data in model space, labels
    explainer_kwargs : passed to :class:`NeuralizedExplainer` for the "lrp" method (rule hybrid)
    """

    def __init__(self, estimator, Z_train, y_train, score="soft", replacement="mean", n_samples=50, seed=0,
                 nsamples_shap=500, explainer_kwargs=None, max_shapley_features=14):
        self.estimator = estimator
        self.Z_train = np.asarray(Z_train, dtype=np.float64)
        self.y_train = np.asarray(y_train)
        self.replacement = replacement
        self.n_samples = n_samples
        self.seed = seed
        self.nsamples_shap = nsamples_shap
        self.max_shapley_features = max_shapley_features
        self.kwargs = dict(explainer_kwargs or {})
        self.explainer = NeuralizedExplainer(**self.kwargs).fit(estimator, self.Z_train, self.y_train)
        self.network = self.explainer.network_
        self.score = ClassScore(estimator, self.network, score)
        self.baseline = self.Z_train.mean(axis=0)
        self.y_idx = np.searchsorted(self.network.classes_, self.y_train)
        self.kde = GaussianKDE(seed=seed).fit(self.Z_train) if replacement == "kde" else None

    def available(self, d: int) -> list[str]:
        methods = list(METHODS_COMMON)
        if self.network.kind == "svm":
            methods += METHODS_SVM
        if d > self.max_shapley_features:
            methods.remove("shapley")
        import importlib.util

        if importlib.util.find_spec("shap") is None:  # cheap; whether it imports is checked once by the caller
            methods.remove("kernelshap")
        return methods

    def context(self, Z):
        """(explained class c, competitor c', sign s) per row, from the LRP explanation."""
        e = self.explainer.explain(Z)
        cls = self.network.classes_
        c = np.searchsorted(cls, e.prediction)
        pos, neg = np.searchsorted(cls, e.positive), np.searchsorted(cls, e.negative)
        s = np.where(pos == c, 1.0, -1.0)
        competitor = np.where(pos == c, neg, pos)
        return e, c, competitor, s

    def relevance(self, method: str, Z, c, competitor, s) -> np.ndarray:
        """Relevance for the explained class of each row (larger = more evidence for c)."""
        eta = sweep_eta(method)
        if method == "lrp" or eta is not None:
            kw = dict(self.kwargs)
            if eta is not None:  # an η sweep is the hybrid rule at that η
                kw.update(eta=eta, rule="hybrid")
            kw.setdefault("rule", "hybrid")
            return s[:, None] * NeuralizedExplainer(**kw).fit(self.estimator, self.Z_train, self.y_train).transform(Z)
        if method in ("gi", "midpoint"):
            kw = dict(self.kwargs, rule=method, eta=None)  # the fixed-η rules (a user's --eta is the hybrid's)
            return s[:, None] * NeuralizedExplainer(**kw).fit(self.estimator, self.Z_train, self.y_train).transform(Z)
        if method == "neuralized_ig":
            return baselines.neuralized_ig(self.explainer, Z, c, competitor)
        if method == "occlusion":
            return baselines.occlusion(self.score.soft, Z, c, self.baseline)  # spec 2.7: F is the soft score,
            # also when the curves use the hard one (±1 hardly moves when one feature is occluded)
        if method == "random":
            return baselines.random_relevance(Z, self.seed)
        if method == "variance":
            return baselines.variance_prior(Z, self.Z_train)
        if method == "centroid":
            return baselines.centroid_difference(Z, c, competitor, self.Z_train, self.y_idx)
        if method == "shapley":
            return baselines.exact_shapley(lambda X, rows: self.score.soft(X, c[rows]), Z, self.baseline,
                                           self.max_shapley_features)
        if method == "kernelshap":
            return baselines.kernel_shap(self.score, Z, c, competitor, self.Z_train, self.nsamples_shap, seed=self.seed)
        if method == "grad_x_input":
            return baselines.gradient_x_input(self.network, Z, c, competitor, np.zeros_like(self.baseline))
        if method == "ig":
            # spec §2.7: the zero reference of GI and IG, as neuralized IG's (the flipping baseline is the
            # training mean: the same point after a StandardScaler, not after MinMax or no scaling)
            return baselines.integrated_gradients(self.network, Z, c, competitor, np.zeros_like(self.baseline))
        if method == "sensitivity":
            return baselines.sensitivity(self.network, Z, c, competitor)
        raise ValueError(f"unknown method {method!r}")

    def run(self, Z, methods=None, log=None, relevances=None) -> dict[str, FlippingResult]:
        """Flip for each method; ``relevances`` may supply precomputed {method: (R, seconds)}."""
        Z = np.asarray(Z, dtype=np.float64)
        _, c, competitor, s = self.context(Z)
        methods = self.available(Z.shape[1]) if methods is None else list(methods)
        results = {}
        for method in methods:
            if relevances and method in relevances:
                R, seconds = relevances[method]
            else:
                t0 = time.perf_counter()
                R = self.relevance(method, Z, c, competitor, s)
                seconds = time.perf_counter() - t0
            curves = flip_curves(self.score, Z, c, R, self.baseline, self.replacement, self.kde, self.n_samples,
                                 self.seed)
            curve = curves.mean(axis=0)
            norm = aupc(curve, normalise=True) if curve[0] != 0 else float("nan")
            results[method] = FlippingResult(method, curve, aupc(curve), norm, seconds,
                                             {"relevance": R, "row_aupc": row_aupc(curves)})
            if log:
                log.info("%-14s AUPC %.4f (normalised %.4f, %s baseline), explained in %.3fs", method,
                         results[method].aupc, norm, self.replacement, seconds)
        return results
