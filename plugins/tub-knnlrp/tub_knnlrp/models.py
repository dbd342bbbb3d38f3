"""Fit reference models and store them without pickle.

A stored model is two files: ``model.safetensors`` (plain float64/int64 arrays: the training set,
the scaler's parameters and, for the SVM, support vectors, dual coefficients and intercepts) and
``model.json`` (kind, hyperparameters, classes, feature names, versions). Loading never runs
code from the file: the scikit-learn estimator is rebuilt by fitting the stored hyperparameters
on the stored training set (kNN and libsvm fits are deterministic) and checked against the
stored fitted arrays, so a version drift that changed the model is an error, not a surprise.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tubcli.errors import TubError

from tub_knnlrp.rules import is_real

FORMAT = "tub-knnlrp/1"
SCALERS = ("standard", "minmax", "robust", "none")
KNN_GRID = list(range(3, 28, 2))
SVM_GAMMA_GRID = [1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0]
SVM_C_GRID = [1e-4, 1e-2, 1.0, 1e2, 1e4]
PARAMS = {"knn": ("k",), "svm": ("C", "gamma")}  # the stored hyperparameters of each kind
SCALER_ATTRS = ("mean_", "scale_", "center_", "min_", "data_min_", "data_max_", "max_abs_")
SVM_ARRAYS = ("svm.support_vectors", "svm.dual_coef", "svm.intercept", "svm.n_support")
SVM_CACHE_MB = 1000  # 12k rows x 30 features: 10.5 s to fit against 18.6 s at scikit-learn's 200 MB


def make_scaler(name: str):
    from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler

    if name not in SCALERS:
        raise TubError(f"unknown scaler {name!r}; use one of {', '.join(SCALERS)}")
    return {"standard": StandardScaler, "minmax": MinMaxScaler, "robust": RobustScaler}.get(name, lambda: None)()


def make_estimator(kind: str, k: int = 5, gamma: float = 0.1, C: float = 1.0):
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    if kind == "knn":
        return KNeighborsClassifier(n_neighbors=int(k))
    if kind == "svm":  # libsvm's kernel cache at 1 GB, not 200 MB: the same solution, fit (and load) ~1.7x faster
        return SVC(kernel="rbf", gamma=float(gamma), C=float(C), cache_size=SVM_CACHE_MB)
    raise TubError(f"unknown model kind {kind!r}; use knn or svm")


def make_pipeline(kind: str, scaler: str = "standard", **params):
    from sklearn.pipeline import Pipeline

    est = make_estimator(kind, **params)
    sc = make_scaler(scaler)
    steps = ([("scaler", sc)] if sc is not None else []) + [("model", est)]
    return Pipeline(steps)


@dataclass
class TrainedModel:
    """A fitted pipeline with the data and hyperparameters that reproduce it."""

    pipeline: object
    kind: str
    scaler: str
    params: dict
    X_train: np.ndarray
    y_train: np.ndarray
    feature_names: list[str]
    cv_score: float | None = None
    grid: list | None = None

    @property
    def classes_(self):
        return self.pipeline.classes_


def fit_model(X, y, kind="knn", scaler="standard", k=None, gamma=None, C=None, folds=5, seed=0,
              feature_names=None, log=None) -> TrainedModel:
    """Fit a kNN or RBF-SVC pipeline; hyperparameters left as None are chosen by 5-fold grid search.

    Grids (spec §4): k ∈ {3, 5, …, 27}; γ ∈ {1e-2, 3e-2, …, 100} × C ∈ {1e-4, 1e-2, 1, 1e2, 1e4}.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    given = {"k": k, "gamma": gamma, "C": C}
    foreign = [f"--{n}" for n, value in given.items() if value is not None and n not in PARAMS.get(kind, given)]
    if foreign:
        other = "svm" if kind == "knn" else "knn"
        raise TubError(f"{', '.join(foreign)}: not used by --model {kind} (only by --model {other}); "
                       f"drop {'it' if len(foreign) == 1 else 'them'}")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise TubError("the labels hold a single class; a classifier needs at least two")
    if kind == "knn":
        if k is not None and (int(k) < 1 or int(k) % 2 == 0):
            raise TubError(f"k={k} is not supported; the neuralized kNN needs an odd k (e.g. 5)")
        grid = {"model__n_neighbors": [int(k)] if k is not None else KNN_GRID}
        # every class needs k_d + κ = k points for the default κ
        grid["model__n_neighbors"] = [v for v in grid["model__n_neighbors"] if v <= counts.min()]
        if not grid["model__n_neighbors"]:
            raise TubError(f"the smallest class has {_rows(counts.min())}; k must not exceed it")
    else:
        grid = {"model__gamma": [float(gamma)] if gamma is not None else SVM_GAMMA_GRID,
                "model__C": [float(C)] if C is not None else SVM_C_GRID}
    pipe = make_pipeline(kind, scaler)
    n_grid = int(np.prod([len(v) for v in grid.values()]))
    cv_score = None
    if n_grid > 1:
        n_folds = min(int(folds), int(counts.min()))
        if n_folds < 2:
            raise TubError(f"the smallest class has {_rows(counts.min())}; grid search needs at least 2 per class")
        if log:
            log.info("grid search over %d settings, %d-fold", n_grid, n_folds)
        search = GridSearchCV(pipe, grid, cv=StratifiedKFold(n_folds, shuffle=True, random_state=seed), n_jobs=1)
        search.fit(X, y)
        best = search.best_params_
        cv_score = float(search.best_score_)
    else:
        best = {key: v[0] for key, v in grid.items()}
    params = {key.split("__", 1)[1]: v for key, v in best.items()}
    params = {"k": params["n_neighbors"]} if kind == "knn" else params
    pipe = make_pipeline(kind, scaler, **params).fit(X, y)
    names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(X.shape[1])]
    return TrainedModel(pipe, kind, scaler, params, X, y, names, cv_score)


# ------------------------------------------------------------------------------ storage
def _class_encoding(y):
    classes = np.unique(y)
    return classes, np.searchsorted(classes, y).astype(np.int64)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def save_model(tm: TrainedModel, directory, name: str = "model") -> tuple[Path, Path]:
    """Write ``<name>.safetensors`` + ``<name>.json`` atomically; returns both paths."""
    from safetensors.numpy import save_file
    import sklearn

    from tubcli.io import atomic_path, write_json
    from tub_knnlrp import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classes, y_idx = _class_encoding(tm.y_train)
    arrays = {"X_train": np.ascontiguousarray(tm.X_train, dtype=np.float64), "y_train": y_idx}
    steps = tm.pipeline.steps
    if tm.scaler != "none":
        sc = steps[0][1]
        for attr in SCALER_ATTRS:
            value = getattr(sc, attr, None)
            if value is not None:
                arrays[f"scaler.{attr}"] = np.asarray(value, dtype=np.float64)
    est = steps[-1][1]
    if tm.kind == "svm":
        arrays["svm.support_vectors"] = np.ascontiguousarray(est.support_vectors_, dtype=np.float64)
        arrays["svm.dual_coef"] = np.ascontiguousarray(est.dual_coef_, dtype=np.float64)
        arrays["svm.intercept"] = np.asarray(est.intercept_, dtype=np.float64)
        arrays["svm.n_support"] = np.asarray(est.n_support_, dtype=np.int64)
    meta = {
        "format": FORMAT,
        "kind": tm.kind,
        "scaler": tm.scaler,
        "params": tm.params,
        "classes": classes.tolist(),
        "feature_names": list(tm.feature_names),
        "cv_score": tm.cv_score,
        "sklearn": sklearn.__version__,
        "tub_knnlrp": __version__,
    }
    st_path, js_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    with atomic_path(st_path) as tmp:
        # one metadata key: safetensors writes several in a random order, and identical runs should give
        # identical files (the format is in the .json)
        save_file(arrays, str(tmp), metadata={"settings_sha256": _settings_digest(meta)})
    write_json(js_path, meta)
    return st_path, js_path


def resolve_model_path(path) -> Path:
    """The ``model.json`` for a run directory, its checkpoints folder, or either model file."""
    p = Path(path)
    # a folder is a run (or its checkpoints): never a sibling file with its name and another suffix
    cands = (p / "model.json", p / "checkpoints" / "model.json") if p.is_dir() else (p, p.with_suffix(".json"))
    for cand in cands:
        if cand.is_file() and cand.suffix == ".json":
            return cand
    if p.suffix in (".joblib", ".pkl", ".pickle") and p.is_file():
        return p
    raise TubError(f"no model found at {p}; pass the run directory of `tub knnlrp train` or its model.json")


def load_model(path, allow_pickle: bool = False) -> TrainedModel:
    """Rebuild a stored model (see the module docstring). ``.joblib`` files need ``allow_pickle``."""
    p = resolve_model_path(path)
    if p.suffix in (".joblib", ".pkl", ".pickle"):
        return _load_pickled(p, allow_pickle)
    from safetensors.numpy import load_file

    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TubError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise _invalid(p, f"it holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise TubError(f"{p} is not a tub-knnlrp model (format {meta.get('format')!r}); train one with tub knnlrp train")
    st = p.with_suffix(".safetensors")
    if not st.is_file():
        raise TubError(f"{st} is missing; a model is the pair model.json + model.safetensors")
    try:
        arrays = load_file(str(st))
    except Exception as exc:
        raise TubError(f"{st} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    _check_stored(meta, arrays, p)
    stored = _stored_digest(st)
    if stored is not None and stored != _settings_digest(meta):  # older models carry no digest
        raise _invalid(p, "its kind, scaler, params, classes or feature names differ from those it was trained "
                          f"with (edited after training; {st.name} records them)")
    classes = np.asarray(meta["classes"])
    X, y = arrays["X_train"], classes[arrays["y_train"]]
    pipe = make_pipeline(meta["kind"], meta["scaler"], **meta["params"]).fit(X, y)
    _verify(pipe, arrays, meta, p)
    return TrainedModel(pipe, meta["kind"], meta["scaler"], dict(meta["params"]), X, y, list(meta["feature_names"]),
                        meta.get("cv_score"))


def _settings_digest(meta: dict) -> str:
    """SHA-256 of the settings in model.json that the stored arrays were fitted with: an edit of
    k, γ, C, the classes or the names would otherwise load as a different, silently wrong model."""
    import hashlib

    keys = ("kind", "scaler", "params", "classes", "feature_names")
    text = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _stored_digest(st: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(st), framework="np") as f:
        return (f.metadata() or {}).get("settings_sha256")


def _invalid(path, reason: str) -> TubError:
    return TubError(f"{path} is not a valid tub-knnlrp model: {reason}; retrain it")


def _check_stored(meta: dict, arrays: dict, path) -> None:
    """What the refit relies on, so that a damaged or edited model is one line, not a traceback."""

    def need(ok, reason):
        if not ok:
            raise _invalid(path, reason)

    kind, scaler, params = meta.get("kind"), meta.get("scaler"), meta.get("params")
    need(kind in PARAMS, f"kind {kind!r} is not knn or svm")
    need(scaler in SCALERS, f"scaler {scaler!r} is not one of {', '.join(SCALERS)}")
    need(isinstance(params, dict), "params is missing")
    need(sorted(params) == list(PARAMS[kind]), f"params {params} must hold exactly {', '.join(PARAMS[kind])}")
    if kind == "knn":
        k = params["k"]
        need(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1, f"k={k!r} is not an odd k >= 1")
    else:
        need(all(is_real(v) and v > 0 for v in params.values()), f"params {params} must be numbers > 0")
    classes = meta.get("classes")
    same_type = isinstance(classes, list) and (all(isinstance(c, str) for c in classes)
                                               or all(isinstance(c, (int, float)) and np.isfinite(c) for c in classes))
    need(same_type and len(classes) >= 2 and classes == sorted(set(classes)),
         "classes must list at least two distinct labels of one type, sorted")
    names = meta.get("feature_names")
    need(isinstance(names, list) and all(isinstance(n, str) for n in names), "feature_names must be a list of strings")
    absent = [key for key in ("X_train", "y_train") + (SVM_ARRAYS if kind == "svm" else ()) if key not in arrays]
    need(not absent, f"array(s) {', '.join(absent)} missing")
    X, y = arrays["X_train"], arrays["y_train"]
    need(X.ndim == 2 and X.shape[1] == len(names) and X.dtype.kind == "f" and np.isfinite(X).all(),
         f"X_train must be a finite float array with {len(names)} columns (one per feature name)")
    need(y.ndim == 1 and len(y) == len(X) and y.dtype.kind in "iu", "y_train must hold one class index per X_train row")
    need(np.array_equal(np.unique(y), np.arange(len(classes))),
         f"y_train must use each of the {len(classes)} listed classes")
    if kind == "knn":
        need(params["k"] <= len(X), f"k={params['k']} exceeds its {len(X)} training rows")


def _verify(pipe, arrays, meta, path) -> None:
    """The refitted estimator must reproduce the stored fitted arrays (1e-8 relative)."""

    def close(a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return a.shape == b.shape and np.allclose(a, b, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(b).max(initial=0)))

    sc = pipe.steps[0][1] if meta["scaler"] != "none" else None
    expected = {"X_train", "y_train", *(SVM_ARRAYS if meta["kind"] == "svm" else ()),
                *(f"scaler.{a}" for a in SCALER_ATTRS if getattr(sc, a, None) is not None)}
    if set(arrays) != expected:
        raise _invalid(path, f"its arrays do not fit a {meta['kind']} model with scaler {meta['scaler']!r} "
                             f"(missing: {', '.join(sorted(expected - set(arrays))) or '-'}; "
                             f"unexpected: {', '.join(sorted(set(arrays) - expected)) or '-'})")
    bad = []
    if sc is not None:
        for key, value in arrays.items():
            if key.startswith("scaler.") and not close(getattr(sc, key[7:]), value):
                bad.append(key)
    if meta["kind"] == "svm":
        est = pipe.steps[-1][1]
        pairs = {"svm.support_vectors": est.support_vectors_, "svm.dual_coef": est.dual_coef_,
                 "svm.intercept": est.intercept_, "svm.n_support": est.n_support_}
        bad += [k for k, v in pairs.items() if not close(v, arrays[k])]
    if bad:
        raise TubError(f"{path}: refitting with scikit-learn {_sk()} does not reproduce the stored "
                       f"{', '.join(bad)} (saved with {meta.get('sklearn')}); retrain the model", exit_code=1)


def _sk():
    import sklearn

    return sklearn.__version__


def _load_pickled(path: Path, allow_pickle: bool) -> TrainedModel:
    if not allow_pickle:
        raise TubError(f"{path.name} is a pickle, and loading it executes code; "
                       "pass --allow-pickle if you trust it, or retrain with tub knnlrp train")
    import joblib
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    from tub_knnlrp.neuralize import split_pipeline

    warnings.warn(f"loading {path.name} with joblib executes code from the file", UserWarning, stacklevel=2)
    try:
        model = joblib.load(path)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TubError(f"cannot load {path.name} with joblib ({type(exc).__name__}: {first}); is it a model file?") from None
    _, est, _ = split_pipeline(model)
    if not isinstance(est, (KNeighborsClassifier, SVC)):
        raise TubError(f"{path.name} holds an object of type {type(est).__name__}, not a scikit-learn model this "
                       "explains; save a fitted KNeighborsClassifier or SVC (alone or at the end of a Pipeline)")
    kind = "knn" if isinstance(est, KNeighborsClassifier) else "svm"
    d = getattr(model, "n_features_in_", None) or getattr(est, "n_features_in_", 0)
    names = [str(n) for n in getattr(model, "feature_names_in_", [f"x{i}" for i in range(d)])]
    # the training set in the original input space is unknown here (a kNN keeps it after preprocessing):
    # explain reads the kNN's own copy; evaluate needs a model trained by tub knnlrp train
    return TrainedModel(model, kind, "unknown", {}, None, None, names)
