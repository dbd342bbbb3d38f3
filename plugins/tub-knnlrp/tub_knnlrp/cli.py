"""Thin verb functions: read inputs, call the science modules, write outputs atomically."""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.io import atomic_path, remove_figure


def _need(value, what: str, hint: str):
    if value is None:
        raise TubError(f"no {what} given; {hint}")
    return value


def _load(cfg, run):
    """The stored model and the rows (a DataFrame if the model was fitted on one), loading notes logged."""
    from tub_knnlrp.data import read_table
    from tub_knnlrp.models import load_model

    _need(cfg.model, "model", "pass --model RUN_DIR (from tub knnlrp train)")
    _need(cfg.data, "data", "pass a CSV, Parquet or NPZ file with the rows")
    table = read_table(cfg.data, cfg.target, text_ok=True)  # validate the data before the (re)fit of the model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tm = load_model(cfg.model, allow_pickle=cfg.allow_pickle)
        finally:  # "executes code from the file" is said also when that file then fails to load
            for w in caught:
                run.log.warning(str(w.message))
    d = len(tm.feature_names)
    default = [f"x{i}" for i in range(d)]  # an NPZ without feature_names, a model fitted on bare arrays
    if tm.feature_names == default and table.feature_names != default and table.X.shape[1] == d:
        tm = replace(tm, feature_names=table.feature_names)  # a model fitted on bare arrays: the table names its columns
    return tm, _model_rows(tm, _by_name(table, tm.feature_names, cfg.data, run), cfg.data)


def _by_name(table, names, path, run):
    """The table's columns that the model was trained on, in its order, when the file names them all and has
    others too (an id, a label column not named by --target) or another order; else the table as it is."""
    if table.feature_names == list(names) or not set(names) <= set(table.feature_names):
        return table
    extra = [n for n in table.feature_names if n not in set(names)]
    if extra:
        run.log.info("%s: column(s) %s%s are not features of the model; left out", Path(path).name,
                     ", ".join(extra[:5]), " ..." if len(extra) > 5 else "")
    keep = [table.feature_names.index(n) for n in names]
    return replace(table, X=table.X[:, keep], feature_names=list(names),
                   text={k: v for k, v in table.text.items() if k in set(names)})


def _model_rows(tm, table, path):
    """The table's feature columns as the model takes them: checked against the model's features, a
    DataFrame when it was fitted on one (text columns only where a pipeline step encodes them)."""
    from tub_knnlrp.data import not_numeric
    from tub_knnlrp.neuralize import split_pipeline

    d = len(tm.feature_names)
    if table.X.shape[1] != d:
        raise TubError(f"{Path(path).name} has {table.X.shape[1]} feature columns, the model expects {d} "
                       f"({', '.join(tm.feature_names[:5])}{' ...' if d > 5 else ''})")
    default = [f"x{i}" for i in range(d)]
    if table.feature_names != tm.feature_names and default not in (table.feature_names, tm.feature_names):
        raise TubError(f"{Path(path).name}: feature columns differ from the model's; "
                       f"first mismatch {next(a + ' vs ' + b for a, b in zip(table.feature_names, tm.feature_names) if a != b)}")
    names_in = getattr(tm.pipeline, "feature_names_in_", None)
    if table.text and (names_in is None or split_pipeline(tm.pipeline)[2]):  # no step of the model encodes text
        raise TubError(not_numeric(path, next(iter(table.text))))
    if names_in is None:
        return table.X
    try:
        import pandas as pd  # a user's model fitted on a DataFrame gets one (scikit-learn warns on bare arrays)
    except ImportError:
        raise TubError("the model was fitted on a pandas DataFrame (it names its columns), so its rows are "
                       "passed as one; pip install pandas") from None

    X = pd.DataFrame(table.X, columns=list(names_in))
    for name, values in table.text.items():
        X[name] = values
    return X


def _training_set(cfg, tm, run):
    """(X_train, y_train) in the input space: the model's own (tub knnlrp train), the rows of --train-data
    (a user's model), or (None, None)."""
    if getattr(cfg, "train_data", None) is None:
        return tm.X_train, tm.y_train
    if tm.X_train is not None:
        raise TubError("the model from tub knnlrp train carries its training set; drop --train-data")
    from tub_knnlrp.data import read_table

    table = read_table(cfg.train_data, cfg.target, require_target=True, text_ok=True)
    unknown = sorted(set(table.y.tolist()) - set(tm.classes_.tolist()), key=str)
    if unknown:
        raise TubError(f"{Path(cfg.train_data).name}: label(s) {', '.join(map(repr, unknown[:3]))} in column "
                       f"{cfg.target!r} are not classes of the model ({', '.join(map(str, tm.classes_[:5]))}); "
                       "pass the rows it was fitted on")
    return _model_rows(tm, _by_name(table, tm.feature_names, cfg.train_data, run), cfg.train_data), table.y


def _logged(run, func, *args, **kwargs):
    """``_science(func, ...)`` with its Python warnings (η heuristic, mixing steps) as one log line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _science(func, *args, **kwargs)
    for message in dict.fromkeys(str(w.message) for w in caught):
        run.log.warning(message)
    return out


def _explain_kwargs(section) -> dict:
    return dict(rule=section.rule, eta=section.eta, kappa=section.kappa, beta=section.beta,
                multiclass=section.multiclass, beta_mc=section.beta_mc)


def numpy_notice(cfg, run) -> None:
    """tub-knnlrp computes with numpy in float64 on the CPU; say so when a verb is asked for another
    device or a lower precision instead of ignoring the flag silently."""
    device, precision = getattr(cfg, "device", "auto"), getattr(cfg, "precision", "fp32")
    if device not in ("auto", "cpu") or precision not in ("fp32", "fp64"):
        run.log.warning("tub-knnlrp computes with numpy in float64 on the CPU: --device %s --precision %s "
                        "do not change that", device, precision)


def _science(func, *args, **kwargs):
    """Model/setting errors from the science modules become one-line TubErrors."""
    try:
        return func(*args, **kwargs)
    except TubError:
        raise
    except ValueError as exc:
        raise TubError(str(exc).splitlines()[0]) from None


# ------------------------------------------------------------------------------------------ train
def train(cfg, run) -> dict:
    numpy_notice(cfg, run)
    from tub_knnlrp.data import read_table
    from tub_knnlrp.models import fit_model, save_model

    _need(cfg.data, "training data", "pass a CSV, Parquet or NPZ file and name its label column with --target")
    table = read_table(cfg.data, cfg.target, require_target=True)
    t0 = time.perf_counter()
    tm = _science(fit_model, table.X, table.y, kind=cfg.kind, scaler=cfg.scaler, k=cfg.k, gamma=cfg.gamma, C=cfg.C,
                  folds=cfg.folds, seed=run.seed, feature_names=table.feature_names, log=run.log)
    seconds = time.perf_counter() - t0
    st, js = save_model(tm, run.checkpoints_dir)
    run.log.info("stored %s and %s", st, js)
    return {
        "kind": cfg.kind,
        "params": tm.params,
        "cv_accuracy": tm.cv_score,
        "train_accuracy": float(np.mean(tm.pipeline.predict(table.X) == table.y)),
        "rows": int(len(table.X)),
        "features": int(table.X.shape[1]),
        "classes": [str(c) for c in tm.classes_],
        "fit_seconds": round(seconds, 3),
        "model": str(js),
    }


# ---------------------------------------------------------------------------------------- explain
def _is_image(names: list[str]) -> int | None:
    side = int(round(len(names) ** 0.5))
    if side * side == len(names) and side >= 4 and all(n.lower().startswith("pixel") for n in names):
        return side
    return None


def explain(cfg, run) -> dict:
    numpy_notice(cfg, run)
    from tub_knnlrp.explanation import explain as explain_rows
    from tub_knnlrp.fidelity import sign_agreement

    tm, X = _load(cfg, run)
    X_train, y_train = _training_set(cfg, tm, run)
    t0 = time.perf_counter()
    e = _logged(run, explain_rows, tm.pipeline, X, X_train=X_train, y_train=y_train if X_train is not None else None,
                feature_names=tm.feature_names, **_explain_kwargs(cfg.explain))
    seconds = time.perf_counter() - t0
    side = _is_image(e.feature_names)
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if cfg.heatmaps and not side:  # checked before anything is written
        raise TubError("heatmaps need a square number of pixel features (columns named pixel_*); drop --heatmaps")
    if cfg.heatmaps and not has_mpl:
        raise TubError("heatmaps need matplotlib: pip install matplotlib (or pass --no-heatmaps)")
    out = run.outputs_dir
    if relevance_columns(e.feature_names)[0] != "g":
        run.log.warning("a feature is named g, pred, positive, negative or row: relevances.csv names the output "
                        "columns knnlrp_g, knnlrp_pred, knnlrp_positive, knnlrp_negative, knnlrp_row")
    with atomic_path(out / "relevances.csv") as tmp:
        _write_relevance_csv(tmp, e)
    with atomic_path(out / "relevances.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, values=e.values, output=e.output, data=e.data,
                     prediction=np.asarray(e.prediction).astype(str), positive=np.asarray(e.positive).astype(str),
                     negative=np.asarray(e.negative).astype(str), feature_names=np.asarray(e.feature_names, dtype=str))
    figures = {}
    remove_figure(out / "heatmaps.png")  # an earlier run's heatmaps (other rows, other data) are not this one's
    if cfg.heatmaps is None and side and not has_mpl:
        run.log.warning("matplotlib is not installed: no heatmaps.png (pip install matplotlib)")
    if side and has_mpl and cfg.heatmaps is not False:
        from tub_knnlrp.plots import relevance_heatmaps

        n_h = cfg.max_heatmaps  # save_figure writes atomically, the vector copy beside the PNG too
        relevance_heatmaps(out / "heatmaps.png", e.data[:n_h], e.values[:n_h], side, prediction=e.prediction[:n_h],
                           positive=e.positive[:n_h], negative=e.negative[:n_h], output=e.output[:n_h])
        figures["heatmaps"] = str(out / "heatmaps.png")
    return {
        "rows": int(len(e.values)),
        "features": int(e.values.shape[1]),
        "kind": e.kind,
        "rule": e.rule,
        "eta": e.eta,
        "kappa": e.kappa,
        "sign_agreement": sign_agreement(tm.pipeline, X, e),
        "seconds": round(seconds, 4),
        "outputs": {"csv": str(out / "relevances.csv"), "npz": str(out / "relevances.npz"), **figures},
    }


def relevance_columns(feature_names) -> list[str]:
    """The columns after the features in relevances.csv: g, pred, positive, negative and row (the row's
    0-based position among the data rows of the input file, to join back on), or knnlrp_g, ... when a
    feature already has one of those names (a CSV with two columns of one name reads back wrong)."""
    extra = ["g", "pred", "positive", "negative", "row"]
    return [f"knnlrp_{c}" for c in extra] if set(extra) & set(feature_names) else extra


def _write_relevance_csv(path, e) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(e.feature_names) + relevance_columns(e.feature_names))
        for i in range(len(e.values)):
            w.writerow([repr(float(v)) for v in e.values[i]] + [repr(float(e.output[i])), e.prediction[i],
                                                              e.positive[i], e.negative[i], i])


# --------------------------------------------------------------------------------------- evaluate
def evaluate(cfg, run) -> dict:
    numpy_notice(cfg, run)
    from tub_knnlrp.fidelity import check_report
    from tub_knnlrp.flipping import FlippingEvaluation, shap_problem, sweep_eta
    from tub_knnlrp.neuralize import split_pipeline, transform_steps

    tm, X = _load(cfg, run)
    X_train, y_train = _training_set(cfg, tm, run)
    X = X[: cfg.rows]
    steps, est, _ = split_pipeline(tm.pipeline)
    if X_train is not None:
        Z_train = transform_steps(steps, X_train)
    elif tm.kind == "knn":  # a user's kNN: the training set it keeps, already in model space
        Z_train, y_train = np.asarray(est._fit_X, dtype=np.float64), est.classes_[np.asarray(est._y).ravel()]
    else:
        raise TubError("an SVC keeps only its support vectors, and feature flipping needs the rows it was fitted on "
                       "(mean baseline, KDE, KernelSHAP background): pass them with --train-data (label column --target)")
    Z = transform_steps(steps, X)
    replacements = ["mean", "kde"] if cfg.replacement == "both" else [cfg.replacement]
    metrics: dict = {"rows": int(len(X)), "score": cfg.score}
    rows_out = []
    problem = shap_problem() if cfg.methods is None or "kernelshap" in cfg.methods else None  # imports shap once
    if problem and cfg.methods is not None:
        raise TubError(f"method kernelshap: {problem}")
    if problem:  # the default list without KernelSHAP: say why
        broken = importlib.util.find_spec("shap") is not None
        (run.log.warning if broken else run.log.info)("KernelSHAP skipped: %s", problem)
    for repl in replacements:
        ev = _logged(run, FlippingEvaluation, est, Z_train, y_train, score=cfg.score, replacement=repl,
                      n_samples=cfg.kde_samples, seed=run.seed, nsamples_shap=cfg.shap_samples,
                      explainer_kwargs=_explain_kwargs(cfg.explain))
        available = [m for m in ev.available(Z.shape[1]) if not (problem and m == "kernelshap")]
        methods = cfg.methods or available
        unknown = [m for m in methods if m not in available and sweep_eta(m) is None]
        if unknown:
            raise TubError(f"unknown or unavailable method(s) {', '.join(unknown)}; available: {', '.join(available)}"
                           " (and lrp_eta0.0 … lrp_eta1.0)")
        results = _logged(run, ev.run, Z, methods, log=run.log)
        metrics[f"aupc_{repl}"] = {m: round(r.aupc, 6) for m, r in results.items()}
        metrics[f"aupc_{repl}_normalised"] = {m: round(r.aupc_normalised, 6) for m, r in results.items()}
        metrics[f"explain_seconds_{repl}"] = {m: round(r.seconds, 4) for m, r in results.items()}
        for m, r in results.items():
            rows_out.append([repl, m, r.aupc, r.aupc_normalised, r.seconds] + list(map(float, r.curve)))
    with atomic_path(run.outputs_dir / "flipping.csv") as tmp:
        import csv

        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            n_points = max(len(r) for r in rows_out) - 5
            w.writerow(["replacement", "method", "aupc", "aupc_normalised"] + [f"flip_{t}" for t in range(n_points)])
            # results only: the wall-clock seconds (metrics.json) would make two identical runs' files differ
            w.writerows(r[:4] + r[5:] for r in rows_out)
    remove_figure(run.outputs_dir / "flipping.png")
    if importlib.util.find_spec("matplotlib") is not None:
        from tub_knnlrp.plots import flipping_curves_plot

        flipping_curves_plot(run.outputs_dir / "flipping.png", rows_out, n_rows=len(Z), kind=tm.kind)  # atomic
    else:
        run.log.info("matplotlib is not installed; no flipping.png")
    metrics["fidelity"] = _logged(run, check_report, tm.pipeline, X, X_train, y_train if X_train is not None else None,
                                  kappa=cfg.explain.kappa)
    metrics["outputs"] = {"csv": str(run.outputs_dir / "flipping.csv")}
    return metrics


# ------------------------------------------------------------------------------------------ check
def check(cfg, run) -> dict:
    numpy_notice(cfg, run)
    from tub_knnlrp.fidelity import check_report

    tm, X = _load(cfg, run)
    y = tm.y_train if tm.X_train is not None else None
    return _logged(run, check_report, tm.pipeline, X, tm.X_train, y, kappa=cfg.kappa)


# -------------------------------------------------------------------------------------- make-data
def make_data(cfg, run) -> dict:
    from sklearn.model_selection import train_test_split

    from tub_knnlrp.data import bundled, write_table_csv

    t = bundled(cfg.name)
    n, n_classes = len(t.y), len(np.unique(t.y))
    n_test = math.ceil(cfg.test_size * n)  # as train_test_split counts
    if min(n_test, n - n_test) < n_classes:
        raise TubError(f"test_size={cfg.test_size} leaves {n_test} test and {n - n_test} training rows of {n}; "
                       f"a stratified split needs {n_classes} (one per class) in each: choose test_size in "
                       f"[{math.ceil(1000 * n_classes / n) / 1000}, {math.floor(1000 * (n - n_classes) / n) / 1000}]")
    Xtr, Xte, ytr, yte = train_test_split(t.X, t.y, test_size=cfg.test_size, random_state=run.seed, stratify=t.y)
    paths = {}
    for split, X, y in (("train", Xtr, ytr), ("test", Xte, yte)):
        path = run.outputs_dir / f"{split}.csv"
        with atomic_path(path) as tmp:
            write_table_csv(tmp, X, t.feature_names, y, "target")
        paths[split] = str(path)
    return {"name": cfg.name, "train_rows": int(len(Xtr)), "test_rows": int(len(Xte)), "features": int(t.X.shape[1]),
            "outputs": paths}
