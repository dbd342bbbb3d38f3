"""Read a fitted scikit-learn kNN or RBF-SVC (optionally inside a Pipeline) into networks.

Accepted (spec §2.3–2.5):

* ``KNeighborsClassifier`` with ``weights="uniform"``, Euclidean metric (``euclidean``, its alias
  ``l2``, ``sqeuclidean`` — the same neighbours — or ``minkowski`` with p = 2), odd k, dense input;
* ``SVC(kernel="rbf")``, binary or multiclass (one-vs-one pairs are rebuilt from the dual
  coefficients), γ taken from the *fitted* numeric value (``"scale"`` and ``"auto"`` resolved);
* either of them as the last step of a ``Pipeline`` whose earlier steps are per-feature (affine
  scalers, a mean/median imputer: explained in model space, each relevance attached to its input
  feature) or other transforms (explained in the transformed space, with a warning).

Anything else raises :class:`UnsupportedModelError` with one line saying why.
"""

from __future__ import annotations

import warnings

import numpy as np

from tubcli.errors import TubError
from tub_knnlrp.networks import NeuralizedKNN, NeuralizedSVM

AFFINE_SCALERS = ("StandardScaler", "MinMaxScaler", "RobustScaler", "MaxAbsScaler")


class UnsupportedModelError(TubError, ValueError):
    """The model, its metric or its settings are outside what the neuralization covers."""


class MixingTransformWarning(UserWarning):
    """A pipeline step mixes features; relevances are given in the transformed space."""


def split_pipeline(model):
    """(preprocessing steps, final estimator, per-feature?) for an estimator or a Pipeline.

    Nested Pipelines are flattened. Per-feature steps keep one model-space feature per input
    feature: the affine scalers, and a ``SimpleImputer`` that drops no column and adds no indicator.
    """
    from sklearn.pipeline import Pipeline

    if isinstance(model, Pipeline):
        steps = _flat_steps(model.steps[:-1])
        final = model.steps[-1][1]
        return steps, final, all(_per_feature(s) for s in steps)
    return [], model, True


def _flat_steps(named_steps) -> list:
    from sklearn.pipeline import Pipeline

    flat = []
    for _, s in named_steps:
        if isinstance(s, Pipeline):
            flat += _flat_steps(s.steps)
        elif s is not None and not (isinstance(s, str) and s == "passthrough"):
            flat.append(s)
    return flat


def _per_feature(step) -> bool:
    if type(step).__name__ in AFFINE_SCALERS:
        return True
    if isinstance(step, str):  # "passthrough" inside a ColumnTransformer
        return step == "passthrough"
    if type(step).__name__ == "FunctionTransformer":  # the identity (a ColumnTransformer's passthrough remainder)
        return step.func is None
    if type(step).__name__ == "Pipeline":
        return all(_per_feature(s) for s in _flat_steps(step.steps))
    if type(step).__name__ == "ColumnTransformer":  # per-feature parts that keep every column in its place
        where = getattr(step, "_transformer_to_input_indices", None)
        if where is None:
            return False
        order = []
        for name, part, _ in step.transformers_:
            columns = list(where.get(name, []))
            if columns and not _per_feature(part):
                return False
            order += columns
        return order == list(range(step.n_features_in_))
    if type(step).__name__ == "SimpleImputer":  # identity on observed values, one column per column
        stats = np.asarray(getattr(step, "statistics_", [np.nan]), dtype=object)
        keeps_all = getattr(step, "keep_empty_features", False) or not any(
            isinstance(v, float) and np.isnan(v) for v in stats)
        return keeps_all and getattr(step, "indicator_", None) is None
    return False


def imputes(steps) -> bool:
    """Whether a step fills missing values (rows with NaN may then be explained)."""
    return any(type(s).__name__ == "SimpleImputer" for s in steps)


def _is_sparse(X) -> bool:
    return hasattr(X, "toarray") and hasattr(X, "nnz")  # scipy.sparse matrices and arrays


def dense(X, name: str = "X"):
    """X unchanged, or a clear error for a scipy sparse matrix (the networks need dense rows)."""
    if _is_sparse(X):
        raise UnsupportedModelError(f"{name} is a sparse matrix; pass a dense array ({name}.toarray())")
    return X


def transform_steps(steps, X):
    for s in steps:
        X = s.transform(X)
    return np.asarray(X, dtype=np.float64)


def _check_fitted(est):
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(est)
    except NotFittedError as exc:
        raise UnsupportedModelError(f"{type(est).__name__} is not fitted; call fit(X, y) first") from exc


def check_knn(knn) -> None:
    """Raise UnsupportedModelError for kNN settings the neuralization does not cover (§2.3)."""
    _check_fitted(knn)
    if callable(knn.weights) or knn.weights != "uniform":
        raise UnsupportedModelError(
            f"kNN weights={knn.weights!r} is not supported; only weights='uniform' has an exact neuralization"
        )
    metric = knn.effective_metric_  # scikit-learn resolves minkowski with p = 1, 2 to manhattan, euclidean
    params = {k: v for k, v in (knn.effective_metric_params_ or {}).items() if v is not None}
    # squared Euclidean distances rank the neighbours as Euclidean ones do: the same classifier
    if metric not in ("euclidean", "l2", "sqeuclidean") or params:
        settings = ", ".join(f"p={v}" if k == "p" else f"metric_params {k!r}" for k, v in params.items())
        shown = repr(metric) + (f" ({settings})" if settings else "")
        raise UnsupportedModelError(
            f"kNN metric {shown} is not supported; use metric='euclidean' (or 'l2', 'sqeuclidean', or "
            "'minkowski' with p=2)"
        )
    if len(knn.classes_) < 2:
        raise UnsupportedModelError(f"the kNN was fitted on one class ({knn.classes_.tolist()[0]!r}): it has no decision to "
                                    "explain; fit it on two classes or more")
    if knn.n_neighbors % 2 == 0:
        raise UnsupportedModelError(
            f"kNN with even k={knn.n_neighbors} is not supported; the neuralization needs an odd k"
        )
    if getattr(knn, "outputs_2d_", False):
        raise UnsupportedModelError("multi-output kNN is not supported; fit one classifier per target")


def check_svc(svc) -> None:
    _check_fitted(svc)
    if svc.kernel != "rbf":
        raise UnsupportedModelError(f"SVC kernel={svc.kernel!r} is not supported; only kernel='rbf' is")
    if getattr(svc, "_sparse", False):
        raise UnsupportedModelError("an SVC fitted on sparse input is not supported; fit it on a dense array")


def svc_gamma(svc, X_train=None) -> float:
    """The fitted numeric γ: ``"scale"`` → 1/(d·Var X), ``"auto"`` → 1/d, numbers as given."""
    if isinstance(svc.gamma, (int, float, np.floating)) and not isinstance(svc.gamma, bool):
        return float(svc.gamma)
    fitted = getattr(svc, "_gamma", None)  # scikit-learn stores the resolved value here
    if isinstance(fitted, (int, float, np.floating)) and fitted > 0:
        return float(fitted)
    if svc.gamma == "auto":
        return 1.0 / svc.n_features_in_
    if svc.gamma == "scale" and X_train is not None:
        X = np.asarray(X_train, dtype=np.float64)
        return 1.0 / (X.shape[1] * X.var())
    raise UnsupportedModelError("cannot resolve the SVC's gamma='scale'; pass X_train or fit with a numeric gamma")


class NeuralizedClassifier:
    """All binary networks of one fitted classifier, in model space (after preprocessing).

    ``network(pos, neg)`` gives the binary network of class index ``pos`` (positive) against
    ``neg``. For a binary model the paper's convention is ``pos = 1`` (``classes_[1]``).
    """

    def __init__(self, kind, classes, *, gamma=None, pair_coef=None, support_vectors=None,
                 sv_class=None, intercepts=None, X_train=None, y_train=None, k=None, median_sqdist=None):
        self.kind = kind
        self.classes_ = np.asarray(classes)
        self.gamma = gamma
        self.support_vectors = support_vectors
        self.sv_class = sv_class
        self.pair_coef = pair_coef  # {(i, j): coefficient vector over all SVs}, i < j, positive → i
        self.intercepts = intercepts  # {(i, j): b}
        self.X_train = X_train
        self.y_train = y_train  # class indices
        self.k = k
        self.median_sqdist = median_sqdist
        self.median_from = "training set"  # the SVM's η heuristic: rows its median distance comes from

    @property
    def n_classes(self) -> int:
        return len(self.classes_)

    @property
    def n_features(self) -> int:
        return (self.X_train if self.kind == "knn" else self.support_vectors).shape[1]

    def network(self, pos: int, neg: int, *, kappa=None, with_intercept=True):
        if pos == neg:
            raise ValueError("a binary network needs two different classes")
        if self.kind == "knn":
            small = min((pos, neg), key=lambda c: int((self.y_train == c).sum()))
            count, decisive = int((self.y_train == small).sum()), (self.k + 1) // 2
            kappa_now = (self.k - 1) // 2 if kappa is None else int(kappa)
            if count < decisive + kappa_now:  # the order-statistic pooling needs k_d + kappa points per class
                odd = count if count % 2 else count - 1  # the default kappa = (k-1)/2 needs k points per class
                fix = (f"pass kappa={count - decisive}{' or less' if count > decisive else ''}" if count >= decisive
                       else f"fit the kNN with k <= {odd} (default kappa), or k <= {2 * count - 1} with kappa=0")
                raise ValueError(f"class {self.classes_.tolist()[small]!r} has {count} training point(s); k={self.k}, "
                                 f"kappa={kappa_now} needs at least {decisive + kappa_now} per class: {fix}")
            return NeuralizedKNN(self.X_train[self.y_train == pos], self.X_train[self.y_train == neg], self.k, kappa)
        i, j = min(pos, neg), max(pos, neg)
        sign = 1.0 if pos == i else -1.0  # OvO pair (i, j): positive decision → class i
        coef = sign * self.pair_coef[(i, j)]
        b = sign * self.intercepts[(i, j)]
        sv = self.support_vectors
        return NeuralizedSVM(sv[coef > 0], sv[coef < 0], coef[coef > 0], -coef[coef < 0], self.gamma, b, with_intercept)


def _check_fitted_set(knn, Xt, y_idx) -> None:
    """A given training set must be the one the kNN was fitted on (in any row order): any other
    set describes another classifier than the one that predicts."""
    if len(Xt) != knn.n_samples_fit_:
        raise UnsupportedModelError(f"X_train has {len(Xt)} rows but the kNN was fitted on {knn.n_samples_fit_}; "
                                    "pass the training set it was fitted on")
    fit_X, fit_y = getattr(knn, "_fit_X", None), getattr(knn, "_y", None)
    if not isinstance(fit_X, np.ndarray) or fit_y is None:
        return  # nothing stored to compare with (e.g. a sparse fit)

    def rows(X, y):
        table = np.column_stack([np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64).ravel()])
        return table[np.lexsort(table.T[::-1])]

    a, b = rows(Xt, y_idx), rows(fit_X, fit_y)
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-9, atol=1e-12):
        raise UnsupportedModelError("X_train/y_train are not the set the kNN was fitted on; pass that set "
                                    "(or leave both out: the fitted model's own set is used)")


def neuralize(model, X_train=None, y_train=None) -> tuple[list, NeuralizedClassifier, bool]:
    """(preprocessing steps, NeuralizedClassifier, per-feature?) for a fitted estimator.

    ``X_train``/``y_train`` (original input space) are optional: the kNN's stored training set
    is used otherwise (checked against ``n_samples_fit_``).
    """
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    steps, est, affine = split_pipeline(model)
    if not isinstance(est, (KNeighborsClassifier, SVC)):  # before X_train goes through anything
        raise UnsupportedModelError(
            f"{type(est).__name__} is not supported; use KNeighborsClassifier or SVC(kernel='rbf'), "
            "alone or as the last step of a Pipeline"
        )
    if not affine:
        names = ", ".join(type(s).__name__ for s in steps if not _per_feature(s))
        warnings.warn(
            f"the pipeline step(s) {names} mix features; relevances are given in the transformed space",
            MixingTransformWarning,
            stacklevel=3,
        )
    Xt = None
    if X_train is not None:
        Xt = transform_steps(steps, dense(X_train, "X_train"))
    if isinstance(est, KNeighborsClassifier):
        check_knn(est)
        if Xt is None and y_train is not None:
            raise UnsupportedModelError("y_train was given without X_train; pass both")
        if Xt is None:
            fit_X = getattr(est, "_fit_X", None)
            fit_y = getattr(est, "_y", None)
            if _is_sparse(fit_X):
                raise UnsupportedModelError("the kNN was fitted on a sparse matrix; pass X_train (dense) and y_train")
            if not isinstance(fit_X, np.ndarray) or fit_y is None or len(fit_X) != est.n_samples_fit_:
                raise UnsupportedModelError(
                    "cannot read the kNN's training set from the fitted model; pass X_train and y_train"
                )
            Xt, y_idx = np.asarray(fit_X, dtype=np.float64), np.asarray(fit_y).ravel()
        else:
            if y_train is None:
                raise UnsupportedModelError("X_train was given without y_train; pass both")
            y = np.asarray(y_train).ravel()
            if len(y) != len(Xt):
                raise UnsupportedModelError(f"X_train has {len(Xt)} rows but y_train {len(y)}; they must match")
            lookup = {c: n for n, c in enumerate(est.classes_.tolist())}
            try:
                y_idx = np.array([lookup[v] for v in y.tolist()])
            except KeyError as exc:
                raise UnsupportedModelError(f"y_train holds label {exc.args[0]!r} that the model does not know") from None
            _check_fitted_set(est, Xt, y_idx)
        return steps, NeuralizedClassifier("knn", est.classes_, X_train=Xt, y_train=y_idx, k=est.n_neighbors), affine
    if isinstance(est, SVC):
        check_svc(est)
        if Xt is not None and Xt.shape[1] != est.shape_fit_[1]:
            raise UnsupportedModelError(f"X_train has {Xt.shape[1]} features but the SVC was fitted on "
                                        f"{est.shape_fit_[1]}; pass the training set it was fitted on")
        gamma = svc_gamma(est, Xt)
        sv = np.asarray(est.support_vectors_, dtype=np.float64)
        n_sv = np.asarray(est.n_support_)
        starts = np.r_[0, np.cumsum(n_sv)]
        sv_class = np.repeat(np.arange(len(n_sv)), n_sv)
        dual = np.asarray(est.dual_coef_, dtype=np.float64)
        pair_coef, intercepts = {}, {}
        n_classes = len(est.classes_)
        if n_classes == 2:
            # binary: decision > 0 → classes_[1], i.e. the OvO pair (1, 0) in our convention
            pair_coef[(0, 1)] = -dual[0]
            intercepts[(0, 1)] = -float(est.intercept_[0])
        else:
            col = 0
            for i in range(n_classes):
                for j in range(i + 1, n_classes):
                    coef = np.zeros(len(sv))
                    coef[starts[i] : starts[i + 1]] = dual[j - 1, starts[i] : starts[i + 1]]
                    coef[starts[j] : starts[j + 1]] = dual[i, starts[j] : starts[j + 1]]
                    pair_coef[(i, j)] = coef
                    intercepts[(i, j)] = float(est.intercept_[col])
                    col += 1
        from tub_knnlrp.rules import median_pairwise_sqdist

        m = median_pairwise_sqdist(Xt if Xt is not None else sv)
        net = NeuralizedClassifier("svm", est.classes_, gamma=gamma, pair_coef=pair_coef, support_vectors=sv,
                                   sv_class=sv_class, intercepts=intercepts, median_sqdist=m)
        net.median_from = "training set" if Xt is not None else "support vectors"
        return steps, net, affine
