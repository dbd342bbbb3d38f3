"""Parity of tub-knnlrp with the authors' code, and agreement with exact Shapley values (spec §6.5, §6.7).

The reference (florianbley/lrp-for-distance-classifiers, no licence) is never vendored: check it
out outside the project and pass its folder:

    git --git-dir=<mirror>/repo archive HEAD | tar -x -C /tmp/ref-knnlrp
    python benchmarks/knnlrp_parity.py --reference /tmp/ref-knnlrp [--json runs/benchmarks/knnlrp_parity.json]

Parity: breast_cancer and digits 4-vs-9 (standard split), kNN k = 5 at the default κ and SVC C = 1
with γ ∈ {0.003, 0.03, 0.3} (intercept as virtual SV); GI, midpoint and hybrid rules; max |ΔR| / max |R|
and max |Δg|. Shapley: Spearman correlation of kNN-LRP with exact Shapley values of the soft score
(zero = mean baseline) on binary iris (versicolor vs virginica), per row, reported not gated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tubcli.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=None, help="folder with neuralised_svm.py / neuralised_knn.py")
    parser.add_argument("--json", default="runs/benchmarks/knnlrp_parity.json")
    args = parser.parse_args()

    from scipy.stats import spearmanr
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    from tub_knnlrp import baselines
    from tub_knnlrp.data import bundled, standard_split
    from tub_knnlrp.explanation import explain
    from tub_knnlrp.scores import ClassScore
    from tub_knnlrp.explanation import NeuralizedExplainer

    out: dict = {"parity": {}, "shapley_spearman": {}}
    if args.reference:
        sys.path.insert(0, str(Path(args.reference).resolve()))
        from neuralised_knn import NeuralisedKNN
        from neuralised_svm import NeuralisedSVM

        rules = [("GI", "gi", 0.0), ("midpoint", "midpoint", 1.0), ("hybrid", "hybrid", 0.8)]
        print(f"{'data':<14} {'model':<16} {'rule':<9} {'max|dR|/max|R|':>15} {'max|dg|':>10}")
        for name in ("breast_cancer", "digits49"):
            t = bundled(name)
            Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
            models = [("knn k=5", KNeighborsClassifier(5).fit(Xtr, ytr))]
            models += [(f"svm g={g}", SVC(C=1.0, gamma=g).fit(Xtr, ytr)) for g in (0.003, 0.03, 0.3)]
            for label, est in models:
                for ref_rule, rule, eta in rules:
                    if label.startswith("knn"):
                        ref = NeuralisedKNN(est)
                        R_ref, g_ref = ref.explain(Xte, rule=ref_rule, eta=eta), ref.forward(Xte)
                    else:
                        ref = NeuralisedSVM(est)
                        R_ref = ref.explain(Xte, rule=ref_rule, eta=eta, with_intercept=True)
                        g_ref = ref.forward(Xte, with_intercept=True)
                    e = explain(est, Xte, rule=rule, eta=eta if rule == "hybrid" else None)
                    dR = float(np.abs(e.values - R_ref).max() / np.abs(R_ref).max())
                    dg = float(np.abs(e.output - g_ref).max())
                    out["parity"][f"{name}/{label}/{rule}"] = {"rel_dR": dR, "abs_dg": dg}
                    print(f"{name:<14} {label:<16} {rule:<9} {dR:15.2e} {dg:10.2e}")
        worst = max(v["rel_dR"] for v in out["parity"].values())
        print(f"worst relative relevance difference: {worst:.2e} (bar <= 1e-10)")
    else:
        print("no --reference given: parity skipped")

    t = bundled("iris_binary")
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    ex = NeuralizedExplainer().fit(knn)
    e = ex.explain(Xte)
    score = ClassScore(knn, ex.network_)
    c = np.searchsorted(knn.classes_, e.prediction)
    s = np.where(c == 1, 1.0, -1.0)
    phi = baselines.exact_shapley(lambda X, rows: score.soft(X, c[rows]), Xte, Xtr.mean(0))
    rho = [spearmanr(s[i] * e.values[i], phi[i]).statistic for i in range(len(Xte)) if np.ptp(phi[i]) > 0]
    out["shapley_spearman"] = {"rows": len(rho), "mean": float(np.nanmean(rho)), "median": float(np.nanmedian(rho))}
    print(f"binary iris: Spearman(kNN-LRP, exact Shapley) mean {np.nanmean(rho):.3f}, median {np.nanmedian(rho):.3f} "
          f"over {len(rho)} rows with non-constant Shapley values")
    print(f"wrote {write_json(args.json, out)}")


if __name__ == "__main__":
    main()
