"""tub-knnlrp against KernelSHAP on the same fitted model and the same rows.

For breast_cancer, digits 4-vs-9 and wine 0-vs-1 (standard split, StandardScaler, kNN k = 5) and an
RBF-SVC (C = 1, γ = 0.03) on breast_cancer:

1. speed: neuralized LRP on the whole test set (median of repeats; ``explain`` including the model's
   own ``predict``, and the LRP pass alone) vs KernelSHAP
   (``KernelExplainer(F, shap.kmeans(X_train, 10))``, 500 samples) on the first ``--rows`` rows;
   per-row ratio. Both sides at ``--threads`` BLAS/OpenMP threads (1); shap is imported and KernelSHAP
   warmed up on one row before its timed run, as tub is warmed up before its repeats;
2. feature flipping (first ``--rows`` rows, most relevant first, mean (= 0) baseline, soft score,
   raw AUPC; lower is better) for kNN-LRP (η = 0.8, κ = 2), GI, midpoint, neuralized IG, occlusion,
   random, centroid difference, variance prior, exact Shapley (d ≤ 14) and KernelSHAP — the
   KernelSHAP relevances are the very ones that were timed;
3. the KDE in-painting variant (normalised AUPC, 50 conditional samples).

    python benchmarks/knnlrp.py [--rows 60] [--json runs/benchmarks/knnlrp.json] [--no-kde]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from tubcli.io import write_json


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, {platform.system()}"


def timed(func, repeats: int) -> tuple[float, tuple[float, float]]:
    """Median seconds over ``repeats`` calls, and (min, max)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (min(times), max(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--svm-rows", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-kde", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads of both sides")
    parser.add_argument("--json", default="runs/benchmarks/knnlrp.json")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # one setting for both sides: unpinned, predict() swung 3-216 ms
    try:
        import shap  # noqa: F401 -- imported before any timing: its import is not KernelSHAP's run time
    except ImportError:
        pass

    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    from tub_knnlrp.data import bundled, standard_split
    from tub_knnlrp.explanation import NeuralizedExplainer
    from tub_knnlrp.flipping import FlippingEvaluation
    from tub_knnlrp.rules import relevance

    results = {"machine": machine(), "rows": args.rows, "threads": args.threads, "datasets": {}}
    cases = [("breast_cancer", "knn"), ("digits49", "knn"), ("wine01", "knn"), ("breast_cancer", "svm")]
    for name, kind in cases:
        t = bundled(name)
        Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
        est = KNeighborsClassifier(5).fit(Xtr, ytr) if kind == "knn" else SVC(C=1.0, gamma=0.03).fit(Xtr, ytr)
        ex = NeuralizedExplainer().fit(est, Xtr, ytr)  # the spec's η from the training set
        ex.explain(Xte)  # warm-up
        tub_s, tub_spread = timed(lambda: ex.explain(Xte), args.repeats)  # includes the model's own predict()
        net = ex.network(1, 0)
        lrp_s, _ = timed(lambda: relevance(Xte, net.moments(Xte), "hybrid", ex.eta_), args.repeats)
        ev = FlippingEvaluation(est, Xtr, ytr)
        Z = Xte[:args.rows if kind == "knn" else args.svm_rows]
        n_rows = len(Z)  # wine has 39 test rows, fewer than --rows
        methods = ev.available(Z.shape[1])
        if "kernelshap" in methods:
            ev.run(Z[:1], ["kernelshap"])  # warm-up, as tub's: the timed run below is KernelSHAP's second
        res = ev.run(Z, methods)
        shap_s = res["kernelshap"].seconds
        row = {
            "model": "kNN k=5" if kind == "knn" else "SVC C=1 gamma=0.03",
            "test_rows": int(len(Xte)),
            "features": int(Xte.shape[1]),
            "tub_seconds_all_rows": tub_s,
            "tub_ms_per_row": 1000 * tub_s / len(Xte),
            "tub_seconds_min_max": list(tub_spread),
            "lrp_pass_seconds_all_rows": lrp_s,
            "kernelshap_rows": n_rows,
            "kernelshap_seconds": shap_s,
            "kernelshap_ms_per_row": 1000 * shap_s / n_rows,
            "speedup_per_row": (shap_s / n_rows) / (tub_s / len(Xte)),
            "aupc_mean": {m: r.aupc for m, r in res.items()},
        }
        if not args.no_kde:
            kev = FlippingEvaluation(est, Xtr, ytr, replacement="kde")
            pre = {m: (res[m].extra["relevance"], res[m].seconds) for m in ("lrp", "gi", "occlusion", "random", "kernelshap")}
            kres = kev.run(Z, list(pre), relevances=pre)
            row["aupc_kde_normalised"] = {m: r.aupc_normalised for m, r in kres.items()}
        key = f"{name}/{kind}"
        results["datasets"][key] = row
        a = row["aupc_mean"]
        print(f"\n== {key} ({row['model']}, {row['features']} features)")
        print(f"speed: tub {row['tub_ms_per_row']:.3f} ms/row ({row['test_rows']} rows in {tub_s * 1000:.1f} ms, "
              f"min-max {tub_spread[0] * 1000:.1f}-{tub_spread[1] * 1000:.1f} ms), "
              f"KernelSHAP {row['kernelshap_ms_per_row']:.0f} ms/row ({n_rows} rows) -> {row['speedup_per_row']:.0f}x; "
              f"LRP pass alone (no predict) {lrp_s * 1000:.1f} ms")
        print("AUPC (mean baseline, raw; lower is better):")
        for m, v in sorted(a.items(), key=lambda kv: kv[1]):
            print(f"  {m:<14} {v:7.3f}")
        if kind == "knn":
            print(f"  kNN-LRP / occlusion = {a['lrp'] / a['occlusion']:.3f} (bar <= 0.5); "
                  f"kNN-LRP < KernelSHAP: {a['lrp'] < a['kernelshap']}")
        if "aupc_kde_normalised" in row:
            print("AUPC (KDE in-painting, normalised): " + ", ".join(
                f"{m} {v:.3f}" for m, v in sorted(row["aupc_kde_normalised"].items(), key=lambda kv: kv[1])))
    print(f"\nmachine: {results['machine']}")
    print(f"wrote {write_json(args.json, results)}")


if __name__ == "__main__":
    main()
