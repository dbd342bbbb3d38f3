"""The public API: explain a fitted kNN or RBF-SVM (or a Pipeline ending in one) by neuralized LRP.

>>> from tub_knnlrp import explain
>>> e = explain(knn, X_test, rule="hybrid")        # doctest: +SKIP
>>> e.values.shape, e.output.shape                  # doctest: +SKIP
((171, 30), (171,))
>>> shap.plots.beeswarm(e.to_shap())                # doctest: +SKIP

Binary models follow the paper (Bley et al., arXiv:2508.03913): g > 0 is ``classes_[1]`` and the
relevances explain g. Multiclass models (our extension, spec §2.4) explain the *predicted* class c
against its strongest competitor: g_c = min_{c'} g_{c,c'} over the binary networks of c against each
other class c', with R from the arg-min pair (``multiclass="min"``), or a soft-min mixture
R = Σ_{c'} w_{c'} R_{c,c'}, g = Σ_{c'} w_{c'} g_{c,c'}, w = softmin(β_mc g_{c,c'}) (``"softmin"``),
which keeps the kNN midpoint rule conservative; that g is ≥ the hard min (at a small β_mc it can be > 0
where one competitor beats c pairwise). For the kNN at κ = 0, g_c > 0 on every row where c holds
a majority of the k votes; on a vote tie scikit-learn picks the tied class first in ``classes_`` and g_c
may be negative (see :mod:`tub_knnlrp.fidelity`, which reports such rows).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from tub_knnlrp.neuralize import (NeuralizedClassifier, UnsupportedModelError, dense, imputes, neuralize,
                                  transform_steps)
from tub_knnlrp.rules import ETA_KNN, eta_svm, is_real, normalize_rule, relevance

RULE_ETA = {"gi": 0.0, "midpoint": 1.0}
"""The η at which the hybrid rule equals the gi or the midpoint rule (reported for those rules)."""


@dataclass
class Explanation:
    """Relevances for n rows and d features, with what they explain.

    values : (n, d) relevance per input feature, in squared-distance units (sums to ``output`` for the
        kNN's midpoint rule only; an SVM's misses g by γ, the pooled offsets and the entropy terms, §2.2)
    output : (n,) the neuralized output g being explained
    prediction : (n,) the model's ``predict``
    positive, negative : (n,) the class pair each row's g compares (g > 0 favours ``positive``)
    data : (n, d) the inputs in the space of ``feature_names`` (NaN where an imputer filled them in: the
        imputed value is what the relevance is given to)
    feature_names : the d names (input names for per-feature pipelines, else the transformed features')
    rule, eta : the LRP rule and its hybrid mixing (0 for ``gi``, 1 for ``midpoint``)
    kappa : the kNN's rank half-window (None for an SVM); beta : the SVM's pooling stiffness (None for a kNN)
    kind : ``"knn"`` or ``"svm"``; info : k, or γ and ``with_intercept``
    """

    values: np.ndarray
    output: np.ndarray
    prediction: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    data: np.ndarray
    feature_names: list[str]
    rule: str
    eta: float
    kappa: int | None = None
    beta: float | None = None
    kind: str = ""
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # the arrays would fill the screen
        n, d = self.values.shape
        settings = ", ".join(f"{k}={v!r}" for k, v in (("eta", self.eta), ("kappa", self.kappa), ("beta", self.beta))
                             if v is not None)
        return f"Explanation(kind={self.kind!r}, rule={self.rule!r}, {settings}, rows={n}, features={d})"

    @property
    def base_values(self) -> np.ndarray:
        return np.zeros(len(self.values))

    def to_shap(self):
        """A ``shap.Explanation`` (base value 0) for shap's waterfall, beeswarm and bar plots. The values
        add up to ``output`` only for the kNN's midpoint rule (η = 1): otherwise, and for every SVM
        (relevances in squared-distance units, §2.2), the f(x) a waterfall prints is Σ R, not the
        explained g; a warning says so."""
        try:
            import shap
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_shap() needs shap: pip install shap") from exc
        if self.kind == "svm" or self.eta != 1.0:
            warnings.warn(f"the {self.kind or 'model'}'s {self.rule} relevances do not add up to the explained output g: "
                          "the f(x) a shap waterfall prints is their sum (only the kNN's midpoint rule is conservative)",
                          UserWarning, stacklevel=2)
        return shap.Explanation(values=self.values, base_values=self.base_values, data=self.data,
                                feature_names=list(self.feature_names))


class NeuralizedExplainer(BaseEstimator):
    """Estimator-style explainer: hyperparameters in ``__init__``, ``fit(model)``, ``explain(X)``.

    A scikit-learn estimator as far as parameters go: ``get_params``/``set_params`` and
    ``sklearn.base.clone`` work; the parameters are validated by ``fit``.

    Parameters
    ----------
    rule : "gi" | "midpoint" | "hybrid"
    eta : hybrid mixing; default 0.8 for kNN and the γ heuristic for the SVM (spec §2.2)
    kappa : kNN rank half-window, 0 … (k − 1)/2; default (k − 1)/2
    beta : SVM pooling stiffness; default γ
    with_intercept : SVM intercept as a virtual support vector (default, makes sign(g) = sign(f))
    multiclass : "min" (hard min over competitors) or "softmin"; a binary model has one pair, where both
        are that pair's g
    beta_mc : stiffness of the multiclass soft-min
    """

    def __init__(self, rule="hybrid", eta=None, kappa=None, beta=None, with_intercept=True,
                 multiclass="min", beta_mc=1.0):
        self.rule = rule
        self.eta = eta
        self.kappa = kappa
        self.beta = beta
        self.with_intercept = with_intercept
        self.multiclass = multiclass
        self.beta_mc = beta_mc

    def _check_params(self) -> None:
        rule = normalize_rule(self.rule)
        if self.multiclass not in ("min", "softmin"):
            raise ValueError(f"multiclass must be 'min' or 'softmin', got {self.multiclass!r}")
        if self.eta is not None and not (is_real(self.eta) and 0 <= self.eta <= 1):
            raise ValueError(f"eta must be a number in [0, 1] (or None for the default), got {self.eta!r}")
        if self.kappa is not None and not (isinstance(self.kappa, numbers.Integral) and not isinstance(self.kappa, bool)
                                           and self.kappa >= 0):
            raise ValueError(f"kappa must be an integer >= 0 (or None for the default), got {self.kappa!r}")
        if self.beta is not None and not (is_real(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a number > 0 (or None for the default γ), got {self.beta!r}")
        if not (is_real(self.beta_mc) and self.beta_mc > 0):
            raise ValueError(f"beta_mc must be a number > 0, got {self.beta_mc!r}")
        if self.eta is not None and rule != "hybrid":  # it would be ignored: gi is η = 0, midpoint η = 1
            raise ValueError(f"eta mixes the hybrid rule; the {rule} rule is η = {RULE_ETA[rule]:g}: drop eta or "
                             "use the hybrid rule")
        if self.multiclass == "min" and self.beta_mc != 1.0:
            raise ValueError("beta_mc is the stiffness of the softmin multiclass mode; the hard min has none: drop "
                             "beta_mc or use multiclass softmin")

    def fit(self, model, X_train=None, y_train=None, feature_names=None):
        """Neuralize a fitted estimator or Pipeline; returns self.

        ``feature_names`` names the model's *input* features (default: the model's
        ``feature_names_in_``); after a mixing step the transformed features are named from them
        by the pipeline's ``get_feature_names_out``. ``X_train``/``y_train``: the kNN's training set
        (default: read from the fitted model), or the SVM's, whose median distance sets the
        default η (default: the support vectors', with a warning).
        """
        self._check_params()
        self.model_ = model
        self.steps_, self.network_, self.per_feature_ = neuralize(model, X_train, y_train)
        if self.network_.kind == "svm" and self.kappa is not None:
            raise ValueError("kappa is the kNN's rank half-window; an SVM has none (beta sets its pooling)")
        if self.network_.kind == "knn":
            if self.beta is not None:
                raise ValueError("beta is the SVM's pooling stiffness; a kNN has none (kappa sets its pooling)")
            if not self.with_intercept:
                raise ValueError("with_intercept is the SVM's intercept as a virtual support vector; a kNN has none: "
                                 "drop with_intercept")
            k = self.network_.k
            if self.kappa is not None and not self.kappa <= (k - 1) // 2:
                raise ValueError(f"kappa must be in 0..{(k - 1) // 2} for k={k}, got {self.kappa}")
        self.feature_names_in_ = _feature_names(model, feature_names, self.steps_, self.per_feature_,
                                                self.network_.n_features)
        return self

    @property
    def eta_(self) -> float:
        if self.eta is not None:
            return float(self.eta)
        if self.network_.kind == "knn":
            return ETA_KNN
        return eta_svm(self.network_.gamma, self.network_.median_sqdist)

    def network(self, pos: int, neg: int):
        """The binary network of class index ``pos`` against ``neg`` (for inspection and tests)."""
        return self.network_.network(pos, neg, kappa=self.kappa, with_intercept=self.with_intercept)

    def explain(self, X) -> Explanation:
        """Relevances for the rows X (input space of the fitted model) as an :class:`Explanation`."""
        if not hasattr(self, "network_"):
            raise NotFittedError("call fit(model) first: explain(X) and transform(X) use the fitted network")
        X = dense(X)
        if self.per_feature_:
            X_in = _as_2d(X, self.network_.n_features, allow_nan=imputes(self.steps_))
            X_user = X if hasattr(X, "columns") else X_in  # a DataFrame goes to scikit-learn with its names
        else:  # a mixing step (one-hot encoding, dropped columns, PCA) reads the raw rows, strings included:
            X_user = X if hasattr(X, "columns") else np.atleast_2d(np.asarray(X))  # only its output is explained
        Z = transform_steps(self.steps_, X_user)
        if Z.shape[1] != self.network_.n_features:
            raise ValueError(f"X has {Z.shape[1]} features after preprocessing, the model expects "
                             f"{self.network_.n_features}")
        net: NeuralizedClassifier = self.network_
        pred = np.asarray(self.model_.predict(X_user))
        lookup = {c: n for n, c in enumerate(net.classes_.tolist())}
        pred_idx = np.array([lookup[v] for v in pred.tolist()], dtype=int)
        rule = normalize_rule(self.rule)
        eta = self.eta_ if rule == "hybrid" else RULE_ETA[rule]
        if rule == "hybrid" and self.eta is None and net.kind == "svm" and net.median_from != "training set":
            warnings.warn(f"default η = {eta:.2f} from the support vectors' median distance (the heuristic takes the "
                          "training set's); pass X_train to fit/explain (--train-data) for the spec's η, or give eta (--eta; a "
                          "model from `tub knnlrp train` keeps its training set)",
                          UserWarning, stacklevel=2)
        n, d = Z.shape
        values, output = np.zeros((n, d)), np.zeros(n)
        pos_idx, neg_idx = np.zeros(n, dtype=int), np.zeros(n, dtype=int)
        info: dict = {"k": net.k} if net.kind == "knn" else {"gamma": net.gamma, "with_intercept": self.with_intercept}
        if net.n_classes == 2:
            m = self.network(1, 0).moments(Z, self.beta)
            values, output = relevance(Z, m, rule, eta), m.output
            pos_idx[:], neg_idx[:] = 1, 0
        else:
            for c in np.unique(pred_idx):
                rows = np.flatnonzero(pred_idx == c)
                Zc = Z[rows]
                others = [o for o in range(net.n_classes) if o != c]
                gs, Rs = [], []
                for o in others:
                    m = self.network(c, o).moments(Zc, self.beta)
                    gs.append(m.output)
                    Rs.append(relevance(Zc, m, rule, eta))
                G, R = np.stack(gs, axis=1), np.stack(Rs, axis=1)  # (r, C-1), (r, C-1, d)
                arg = G.argmin(axis=1)
                if self.multiclass == "min":
                    output[rows] = G[np.arange(len(rows)), arg]
                    values[rows] = R[np.arange(len(rows)), arg]
                else:
                    a = -float(self.beta_mc) * G
                    w = np.exp(a - a.max(axis=1, keepdims=True))
                    w /= w.sum(axis=1, keepdims=True)
                    output[rows] = (w * G).sum(axis=1)
                    values[rows] = np.einsum("rc,rcd->rd", w, R)
                pos_idx[rows] = c
                neg_idx[rows] = np.asarray(others)[arg]
        data = X_in if self.per_feature_ else Z
        kappa = None
        if net.kind == "knn":
            kappa = (net.k - 1) // 2 if self.kappa is None else int(self.kappa)
        beta = None if net.kind == "knn" else (net.gamma if self.beta is None else float(self.beta))
        return Explanation(values=values, output=output, prediction=pred, positive=net.classes_[pos_idx],
                           negative=net.classes_[neg_idx], data=np.asarray(data, dtype=np.float64),
                           feature_names=list(self.feature_names_in_), rule=rule, eta=eta, kappa=kappa,
                           beta=beta, kind=net.kind, info=info)

    def transform(self, X) -> np.ndarray:
        """The relevances alone, (n, d)."""
        return self.explain(X).values

    def __call__(self, X) -> Explanation:
        return self.explain(X)


def explain(model, X, rule="hybrid", eta=None, kappa=None, beta=None, *, with_intercept=True,
            multiclass="min", beta_mc=1.0, X_train=None, y_train=None, feature_names=None) -> Explanation:
    """Explain ``model.predict(X)`` for a fitted kNN/RBF-SVC or a Pipeline ending in one.

    rule : "gi" | "midpoint" | "hybrid"; eta : hybrid mixing [0.8 kNN, the γ heuristic SVM];
    kappa : kNN rank half-window [(k − 1)/2]; beta : SVM pooling stiffness [γ];
    with_intercept, multiclass, beta_mc : see :class:`NeuralizedExplainer`;
    X_train, y_train : the training set (a kNN's is read from the model; an SVM's sets the default η);
    feature_names : names of the input features [X's columns, or the model's ``feature_names_in_``].
    Returns an :class:`Explanation`.
    """
    explainer = NeuralizedExplainer(rule=rule, eta=eta, kappa=kappa, beta=beta, with_intercept=with_intercept,
                                    multiclass=multiclass, beta_mc=beta_mc)
    if feature_names is None and hasattr(X, "columns"):  # the input features, by the DataFrame's columns
        n_in = getattr(model, "n_features_in_", None)
        if n_in is not None and len(X.columns) != n_in:
            raise ValueError(f"X has {len(X.columns)} columns, the model expects {n_in}")
        feature_names = [str(c) for c in X.columns]
    return explainer.fit(model, X_train, y_train, feature_names=feature_names).explain(X)


def _as_2d(X, n_features, allow_nan=False):
    if hasattr(X, "to_numpy"):
        try:  # pandas' nullable dtypes hold pd.NA, which numpy cannot make a float of
            X = X.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            X = X.to_numpy()  # non-numeric columns: the float conversion below names the problem
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows, features), got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"X has {X.shape[1]} features, the model expects {n_features}")
    bad = np.isinf(X) if allow_nan else ~np.isfinite(X)  # NaN passes when the pipeline imputes it
    if bad.any():
        raise ValueError("X contains infinite values" if allow_nan else
                         "X contains NaN or infinite values; impute them before explaining")
    return X


def _feature_names(model, given, steps, per_feature, d):
    """Names of the d model-space features: the input names for per-feature pipelines, else the
    names the preprocessing steps give their outputs (from the input names)."""
    inputs = getattr(model, "feature_names_in_", None)
    n_in = getattr(steps[0] if steps else model, "n_features_in_", None)
    if given is not None:
        inputs = [str(n) for n in given]
        if n_in is not None and len(inputs) != n_in:
            raise UnsupportedModelError(f"{len(inputs)} feature names given for {n_in} input features")
    if per_feature:
        names = [str(n) for n in inputs] if inputs is not None else [f"x{i}" for i in range(d)]
        if len(names) != d:
            raise UnsupportedModelError(f"{len(names)} feature names given for {d} features")
        return names
    for start in ([None] if inputs is None else [np.asarray(inputs, dtype=object), None]):
        names = start  # the given names; else (a step fitted with other names refuses them) the fitted ones
        try:
            for s in steps:
                names = s.get_feature_names_out(names)
        except Exception:  # noqa: BLE001 - a step without get_feature_names_out, or names it refuses
            continue
        if len(names) == d:
            return [str(n) for n in names]
    return [f"t{i}" for i in range(d)]
