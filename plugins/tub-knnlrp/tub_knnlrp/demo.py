"""`tub demo knnlrp`: train, store, reload, explain, check and flip on scikit-learn's bundled data.

Breast cancer (kNN, k = 5) and digits 4-vs-9 (heatmaps): a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import time

import numpy as np


def run_demo(run) -> dict:
    from sklearn.model_selection import train_test_split

    from tub_knnlrp.cli import numpy_notice
    from tub_knnlrp.data import bundled, write_table_csv
    from tub_knnlrp.explanation import explain
    from tub_knnlrp.fidelity import check_report
    from tub_knnlrp.flipping import FlippingEvaluation
    from tub_knnlrp.models import fit_model, load_model, save_model
    from tub_knnlrp.neuralize import split_pipeline, transform_steps

    numpy_notice(run.cfg, run)
    out = run.outputs_dir
    t = bundled("breast_cancer")
    Xtr, Xte, ytr, yte = train_test_split(t.X, t.y, test_size=0.3, random_state=0, stratify=t.y)
    write_table_csv(out / "train.csv", Xtr, t.feature_names, ytr)
    write_table_csv(out / "test.csv", Xte, t.feature_names, yte)
    tm = fit_model(Xtr, ytr, kind="knn", k=5, feature_names=t.feature_names)
    save_model(tm, run.checkpoints_dir)
    tm = load_model(run.checkpoints_dir)  # rebuilt from plain arrays, no pickle
    run.log.info("breast_cancer: kNN k=5, test accuracy %.3f", np.mean(tm.pipeline.predict(Xte) == yte))

    t0 = time.perf_counter()
    e = explain(tm.pipeline, Xte, rule="hybrid", X_train=tm.X_train, y_train=tm.y_train,
                feature_names=t.feature_names)
    seconds = time.perf_counter() - t0
    fid = check_report(tm.pipeline, Xte, tm.X_train, tm.y_train)

    steps, est, _ = split_pipeline(tm.pipeline)
    ev = FlippingEvaluation(est, transform_steps(steps, tm.X_train), tm.y_train)
    methods = ["lrp", "occlusion", "random", "centroid"]
    res = ev.run(transform_steps(steps, Xte[:60]), methods, log=run.log)

    # digits 4 vs 9: pixel heatmaps
    d = bundled("digits49")
    dtr, dte, ydtr, ydte = train_test_split(d.X, d.y, test_size=0.3, random_state=0, stratify=d.y)
    dm = fit_model(dtr, ydtr, kind="knn", k=5, feature_names=d.feature_names)
    de = explain(dm.pipeline, dte[:8], X_train=dtr, y_train=ydtr)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        from tub_knnlrp.plots import relevance_heatmaps

        relevance_heatmaps(out / "digits49_heatmaps.png", de.data, de.values, 8, prediction=de.prediction,
                           positive=de.positive, negative=de.negative, output=de.output)
    else:
        run.log.info("matplotlib missing: no heatmap figure")
    return {
        "breast_cancer_rows_explained": int(len(e.values)),
        "explain_ms": round(1000 * seconds, 2),
        "sign_agreement_kappa0": fid["kappa0"]["sign_agreement"],
        "conservation_max_rel_error": max(fid[k]["conservation_max_rel_error"] for k in fid if k.startswith("kappa")),
        "aupc_knn_lrp": round(res["lrp"].aupc, 4),
        "aupc_occlusion": round(res["occlusion"].aupc, 4),
        "aupc_random": round(res["random"].aupc, 4),
    }
