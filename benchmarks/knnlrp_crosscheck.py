"""An independent re-computation of the spec §6.3 flipping figures on wine 0-vs-1 (or another set).

Written from the spec alone, without tub's flipping, scoring or baseline code: a scikit-learn
``Pipeline(StandardScaler, KNeighborsClassifier(5))`` fitted on the raw training part of the standard
split; flipping in *input* space with the raw training mean as the removed value, one feature per
step (per-row Python loop); kNN-LRP from the formulas with scikit-learn's ``NearestNeighbors`` per
class (ranks 1…5, η = 0.8), compared with ``tub_knnlrp.explain`` on the pipeline; KernelSHAP on the
pipeline with ``shap.kmeans`` of the raw training data; exact Shapley values by 2^d enumeration;
occlusion. It checks that tub's figures are not an artefact of the model-space shortcut or of a
bug in the flipping code.

    python benchmarks/knnlrp_crosscheck.py [--data wine01] [--rows 60]
"""

from __future__ import annotations

import argparse
from math import factorial

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="wine01")
    parser.add_argument("--rows", type=int, default=60)
    args = parser.parse_args()

    import shap
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tub_knnlrp import explain
    from tub_knnlrp.data import bundled

    t = bundled(args.data)
    Xtr, Xte, ytr, _ = train_test_split(t.X, t.y, test_size=0.3, random_state=0, stratify=t.y)
    pipe = make_pipeline(StandardScaler(), KNeighborsClassifier(5)).fit(Xtr, ytr)
    Xf = Xte[: args.rows]
    n, d = Xf.shape
    mu = Xtr.mean(axis=0)
    pos = pipe.classes_[1]
    s = np.where(pipe.predict(Xf) == pos, 1.0, -1.0)

    def F(A):  # p₊ − p₋
        P = pipe.predict_proba(A)
        return P[:, 1] - P[:, 0]

    # kNN-LRP from the formulas (κ = 2: ranks 1…5 of each class), in the scaler's space
    sc = pipe[0]
    Ztr, Zf = sc.transform(Xtr), sc.transform(Xf)
    mom = {}
    for cls in pipe.classes_:
        P = Ztr[ytr == cls]
        sel = P[NearestNeighbors(n_neighbors=5).fit(P).kneighbors(Zf, return_distance=False)]
        mom[cls] = (sel.mean(axis=1), ((Zf[:, None] - sel) ** 2).mean(axis=1))
    neg = pipe.classes_[0]
    R_formula = 0.2 * (Zf * 2 * (mom[pos][0] - mom[neg][0])) + 0.8 * (mom[neg][1] - mom[pos][1])
    e = explain(pipe, Xf)
    print(f"tub explain(pipeline) vs formulas: max |ΔR| = {np.abs(e.values - R_formula).max():.1e}")

    def aupc_of(R):
        curves = np.zeros((n, d + 1))
        for r in range(n):
            x = Xf[r].copy()
            curves[r, 0] = s[r] * F(x[None])[0]
            for step, j in enumerate(np.argsort(-(s[r] * R[r]), kind="stable"), start=1):
                x[j] = mu[j]
                curves[r, step] = s[r] * F(x[None])[0]
        c = curves.mean(axis=0)
        return float(np.sum(c[1:] + c[:-1]) / (2 * d))

    res = {"kNN-LRP (tub, pipeline)": e.values}
    np.random.seed(0)
    res["KernelSHAP (input space)"] = np.asarray(
        shap.KernelExplainer(F, shap.kmeans(Xtr, 10)).shap_values(Xf, nsamples=500, silent=True)).reshape(n, d)
    if d <= 16:
        codes = np.arange(2**d)
        M = ((codes[:, None] >> np.arange(d)) & 1).astype(bool)
        w = np.array([factorial(k) * factorial(d - k - 1) / factorial(d) for k in range(d)])
        phi = np.zeros((n, d))
        for r in range(n):
            v = s[r] * F(np.where(M, Xf[r], mu))
            for j in range(d):
                S = codes[~M[:, j]]
                phi[r, j] = ((v[S | (1 << j)] - v[S]) * w[M[S].sum(axis=1)]).sum()
        res["exact Shapley"] = s[:, None] * phi  # back to the p₊ − p₋ orientation
    occ = np.zeros((n, d))
    for j in range(d):
        A = Xf.copy()
        A[:, j] = mu[j]
        occ[:, j] = F(Xf) - F(A)
    res["occlusion"] = occ
    print(f"{args.data}: {n} rows, {d} features, raw AUPC (mean baseline, soft score, lower is better)")
    for name, R in res.items():
        print(f"  {name:<26} {aupc_of(R):.4f}")


if __name__ == "__main__":
    main()
