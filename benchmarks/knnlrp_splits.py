"""Feature flipping over repeated stratified splits: how robust is the spec §6.3 comparison?

The spec's figure is one split (``train_test_split(test_size=0.3, random_state=0, stratify=y)``).
On wine 0-vs-1 that is 39 test rows, too few to separate methods reliably. This script repeats the
*unchanged* protocol — StandardScaler on the training part, kNN k = 5, kNN-LRP with the spec
defaults (hybrid η = 0.8, κ = (k − 1)/2 = 2), first ``--rows`` test rows, most relevant first by s·R,
one feature per step to the fully flipped end point, training mean (= 0) baseline, soft score
s·(p₊ − p₋), raw AUPC — for ``random_state`` = 0 … ``--seeds`` − 1 (seed 0 is the spec's split) and
reports

* per method: mean ± standard error of the AUPC over splits;
* paired kNN-LRP − KernelSHAP: per split the mean per-row AUPC difference with its row-level 95 %
  t interval, and over splits the mean with the Nadeau–Bengio corrected resampled-t 95 % interval
  (Machine Learning 52, 2003: variance × (1/J + n_test/n_train), J − 1 degrees of freedom), which
  accounts for the overlap between the splits' training sets;
* the same comparison with the authors' hard score (s·ŷ, ŷ ∈ {−1, +1}) and with KDE in-painting
  (normalised AUPC as in their evaluation code, paired on raw per-row AUPC);
* where exact Shapley values exist (d ≤ 14): how close KernelSHAP and kNN-LRP are to them
  (median per-row Spearman correlation);
* ``--budget-sweep``: KernelSHAP's AUPC on the spec split as its sample budget grows;
* ``--drift``: how many of the selected neighbours are replaced after the first few flips;
* ``--tie-check``: occlusion's AUPC when its many exact-zero relevances are ordered at random;
* ``--k grid``: a sensitivity check with k chosen per split by the `train` verb's grid search
  (the authors' protocol) instead of the spec's k = 5 — the same rule for every data set.

    python benchmarks/knnlrp_splits.py [--seeds 10] [--rows 60] [--datasets breast_cancer digits49 wine01]
        [--k 5|grid] [--tie-check] [--drift] [--budget-sweep 500,2000,8000] [--json runs/benchmarks/knnlrp_splits.json]

No explanation method's settings depend on the data set or the split.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from tubcli.io import write_json

METHODS = ["lrp", "gi", "midpoint", "neuralized_ig", "centroid", "occlusion", "random", "kernelshap", "shapley"]
KDE_METHODS = ["lrp", "gi", "occlusion", "random", "kernelshap"]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, {platform.system()}"


def t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_rows(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of a − b over rows with a row-level 95 % t interval, and the win/tie/loss counts."""
    d = np.asarray(a) - np.asarray(b)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    h = t_quantile(len(d) - 1) * se if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": float(se), "ci95": [float(d.mean() - h), float(d.mean() + h)],
            "a_lower": int((d < 0).sum()), "tie": int((d == 0).sum()), "a_higher": int((d > 0).sum())}


def over_splits(values, test_train_ratio: float) -> dict:
    """Mean ± s.e. over splits, and the Nadeau–Bengio corrected resampled-t 95 % interval."""
    v = np.asarray(values, dtype=np.float64)
    J = len(v)
    out = {"mean": float(v.mean()), "n_splits": J, "se": float("nan"), "ci95_corrected": [float("nan")] * 2}
    if J > 1:
        s2 = v.var(ddof=1)
        out["se"] = float(np.sqrt(s2 / J))
        h = t_quantile(J - 1) * np.sqrt((1.0 / J + test_train_ratio) * s2)
        out["ci95_corrected"] = [float(v.mean() - h), float(v.mean() + h)]
    return out


def spearman_rows(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    from scipy.stats import spearmanr

    out = []
    for a, b in zip(A, B):
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            out.append(spearmanr(a, b).statistic)
    return np.asarray(out)


def choose_k(k: str, Xtr, ytr, seed: int) -> int:
    """k = 5 (spec §6), or ``"grid"``: the `train` verb's (and the authors') 5-fold grid search over
    k ∈ {3, 5, …, 27} on the training part only."""
    if k != "grid":
        return int(k)
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    from tub_knnlrp.models import KNN_GRID

    grid = [v for v in KNN_GRID if v <= np.bincount(np.unique(ytr, return_inverse=True)[1]).min()]
    search = GridSearchCV(KNeighborsClassifier(), {"n_neighbors": grid},
                          cv=StratifiedKFold(5, shuffle=True, random_state=seed), n_jobs=1)
    return int(search.fit(Xtr, ytr).best_params_["n_neighbors"])


def one_split(name: str, seed: int, rows: int, kde: bool, k: str = "5") -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    from tub_knnlrp.data import bundled, standard_split
    from tub_knnlrp.flipping import FlippingEvaluation

    t = bundled(name)
    Xtr, Xte, ytr, yte = standard_split(t.X, t.y, seed=seed)
    k_used = choose_k(k, Xtr, ytr, seed)
    knn = KNeighborsClassifier(k_used).fit(Xtr, ytr)
    Z = Xte[:rows]
    ev = FlippingEvaluation(knn, Xtr, ytr)
    methods = [m for m in METHODS if m in ev.available(Z.shape[1])]
    res = ev.run(Z, methods)
    e, c, _, s = ev.context(Z)
    out = {
        "seed": seed, "k": k_used, "n_train": int(len(Xtr)), "n_test": int(len(Xte)), "rows": int(len(Z)),
        "accuracy": float(knn.score(Xte, yte)),
        "sign_agreement_kappa2": float(np.mean(np.sign(e.output) == s)),
        "aupc": {m: r.aupc for m, r in res.items()},
        "row_aupc": {m: r.extra["row_aupc"] for m, r in res.items()},
        "seconds": {m: r.seconds for m, r in res.items()},
    }
    pre = {m: (res[m].extra["relevance"], res[m].seconds) for m in methods}
    hard = FlippingEvaluation(knn, Xtr, ytr, score="hard").run(Z, methods, relevances=pre)
    out["aupc_hard"] = {m: r.aupc for m, r in hard.items()}
    out["row_aupc_hard"] = {m: r.extra["row_aupc"] for m, r in hard.items()}
    if kde:
        kev = FlippingEvaluation(knn, Xtr, ytr, replacement="kde", seed=seed)
        kres = kev.run(Z, KDE_METHODS, relevances={m: pre[m] for m in KDE_METHODS})
        out["aupc_kde_normalised"] = {m: r.aupc_normalised for m, r in kres.items()}
        out["row_aupc_kde"] = {m: r.extra["row_aupc"] for m, r in kres.items()}
    if "shapley" in res:
        phi = res["shapley"].extra["relevance"]
        out["spearman_vs_exact_shapley"] = {
            m: float(np.median(spearman_rows(res[m].extra["relevance"], phi))) for m in ("kernelshap", "lrp", "gi")
        }
    return out


def budget_sweep(name: str, budgets: list[int], rows: int) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    from tub_knnlrp.data import bundled, standard_split
    from tub_knnlrp.flipping import FlippingEvaluation

    t = bundled(name)
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    Z = Xte[:rows]
    out = {"lrp": FlippingEvaluation(knn, Xtr, ytr).run(Z, ["lrp"])["lrp"].aupc, "kernelshap": {}}
    for b in budgets:
        r = FlippingEvaluation(knn, Xtr, ytr, nsamples_shap=b).run(Z, ["kernelshap"])["kernelshap"]
        out["kernelshap"][str(b)] = {"aupc": r.aupc, "seconds_per_row": r.seconds / len(Z)}
        print(f"  {name}: KernelSHAP nsamples={b:<6d} AUPC {r.aupc:.3f} ({r.seconds / len(Z):.2f} s/row); "
              f"kNN-LRP {out['lrp']:.3f}", flush=True)
    return out


def spec_split_context(name: str, rows: int):
    """The spec split of ``name`` with a 5-NN fitted on it: training data, the first ``rows`` test rows,
    the flipping evaluation and its context (predicted class, competitor, sign)."""
    from sklearn.neighbors import KNeighborsClassifier

    from tub_knnlrp.data import bundled, standard_split
    from tub_knnlrp.flipping import FlippingEvaluation

    t = bundled(name)
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    ev = FlippingEvaluation(KNeighborsClassifier(5).fit(Xtr, ytr), Xtr, ytr)
    Z = Xte[:rows]
    _, c, comp, s = ev.context(Z)
    return Xtr, ytr, Z, ev, c, comp, s


def occlusion_ties(name: str, rows: int, repeats: int = 20) -> dict:
    """Occlusion relevance of a kNN is mostly exactly 0 (one removed feature rarely changes the vote);
    the spec's order is silent on ties, the flipping code breaks them by feature index (stable sort).
    Compare with random tie-breaking (a 1e-9 jitter, ``repeats`` seeds) on the spec split."""
    from tub_knnlrp.flipping import aupc, flip_curves

    Xtr, ytr, Z, ev, c, comp, s = spec_split_context(name, rows)
    R = ev.relevance("occlusion", Z, c, comp, s)
    lrp = aupc(flip_curves(ev.score, Z, c, ev.relevance("lrp", Z, c, comp, s), ev.baseline).mean(0))
    rng = np.random.default_rng(0)
    jitter = [aupc(flip_curves(ev.score, Z, c, R + 1e-9 * rng.standard_normal(R.shape), ev.baseline).mean(0))
              for _ in range(repeats)]
    out = {"zero_fraction": float(np.mean(R == 0)), "stable": aupc(flip_curves(ev.score, Z, c, R, ev.baseline).mean(0)),
           "random_ties_mean": float(np.mean(jitter)), "random_ties_min": float(np.min(jitter)),
           "random_ties_max": float(np.max(jitter)), "lrp": lrp}
    print(f"  {name}: occlusion relevances exactly 0: {out['zero_fraction']:.0%}; AUPC stable ties {out['stable']:.3f}, "
          f"random ties {out['random_ties_mean']:.3f} [{out['random_ties_min']:.3f}, {out['random_ties_max']:.3f}]; "
          f"LRP/occlusion {lrp / out['stable']:.2f} (stable), {lrp / out['random_ties_min']:.2f} (worst random)")
    return out


def neighbour_drift(name: str, rows: int, steps: int = 5) -> dict:
    """How fast the frozen-neighbour picture goes stale: the mean fraction of the 2k selected
    neighbours (ranks 1…k of each class, κ = (k − 1)/2) that are replaced after t mean-baseline flips
    in the kNN-LRP and the KernelSHAP order (spec split)."""
    from sklearn.neighbors import NearestNeighbors

    Xtr, ytr, Z, ev, c, comp, s = spec_split_context(name, rows)
    nn = [NearestNeighbors(n_neighbors=5).fit(Xtr[ytr == k]) for k in np.unique(ytr)]
    out = {}
    for m in ("lrp", "kernelshap"):
        R = ev.relevance(m, Z, c, comp, s)
        order = np.argsort(-R, axis=1, kind="stable")
        X = Z.copy()
        base = [n.kneighbors(X, return_distance=False) for n in nn]
        frac = []
        for step in range(steps):
            X[np.arange(len(X)), order[:, step]] = ev.baseline[order[:, step]]
            cur = [n.kneighbors(X, return_distance=False) for n in nn]
            kept = sum(len(set(a) & set(b)) for B, C in zip(base, cur) for a, b in zip(B, C))
            frac.append(1.0 - kept / (5 * len(nn) * len(X)))
        out[m] = frac
    print(f"  {name}: neighbours replaced after 1…{steps} flips: kNN-LRP order "
          + " ".join(f"{v:.2f}" for v in out["lrp"]) + "; KernelSHAP order " + " ".join(f"{v:.2f}" for v in out["kernelshap"]))
    return out


def summarise(name: str, splits: list[dict]) -> dict:
    ratio = float(np.mean([s["n_test"] / s["n_train"] for s in splits]))
    methods = list(splits[0]["aupc"])
    summary = {"aupc": {m: over_splits([s["aupc"][m] for s in splits], ratio) for m in methods},
               "aupc_hard": {m: over_splits([s["aupc_hard"][m] for s in splits], ratio) for m in methods}}
    for key, rows_key in (("soft", "row_aupc"), ("hard", "row_aupc_hard"), ("kde", "row_aupc_kde")):
        if rows_key not in splits[0]:
            continue
        per = [paired_rows(s[rows_key]["lrp"], s[rows_key]["kernelshap"]) for s in splits]
        summary[f"lrp_minus_kernelshap_{key}"] = {
            "per_split": per,
            "over_splits": over_splits([p["mean"] for p in per], ratio),
            "splits_lrp_lower": int(sum(p["mean"] < 0 for p in per)),
            "rows": {k: int(sum(p[k] for p in per)) for k in ("a_lower", "tie", "a_higher")},
        }
    if "aupc_kde_normalised" in splits[0]:
        summary["aupc_kde_normalised"] = {
            m: over_splits([s["aupc_kde_normalised"][m] for s in splits], ratio) for m in KDE_METHODS}
    ratios = [s["aupc"]["lrp"] / s["aupc"]["occlusion"] for s in splits]
    summary["lrp_over_occlusion"] = over_splits(ratios, ratio)
    summary["splits_meeting"] = {
        "lrp_le_half_occlusion": int(sum(r <= 0.5 for r in ratios)),
        "lrp_below_kernelshap": int(sum(s["aupc"]["lrp"] < s["aupc"]["kernelshap"] for s in splits)),
    }
    if "spearman_vs_exact_shapley" in splits[0]:
        summary["spearman_vs_exact_shapley"] = {
            m: float(np.mean([s["spearman_vs_exact_shapley"][m] for s in splits])) for m in ("kernelshap", "lrp", "gi")}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits49", "wine01"])
    parser.add_argument("--k", default="5", help='kNN k: an odd number (spec: 5) or "grid" (5-fold search, '
                        "k in 3..27, on each split's training part; the authors' protocol)")
    parser.add_argument("--no-kde", action="store_true")
    parser.add_argument("--budget-sweep", default="", help="comma-separated KernelSHAP sample budgets (spec split)")
    parser.add_argument("--sweep-rows", type=int, default=20)
    parser.add_argument("--drift", action="store_true", help="neighbour-set drift along the flipping order")
    parser.add_argument("--tie-check", action="store_true", help="occlusion with random tie-breaking (spec split)")
    parser.add_argument("--json", default="runs/benchmarks/knnlrp_splits.json")
    args = parser.parse_args()

    t0 = time.perf_counter()
    results = {"machine": machine(), "seeds": args.seeds, "rows": args.rows, "k": args.k, "datasets": {}}
    for name in args.datasets:
        splits = []
        for seed in range(args.seeds):
            s = one_split(name, seed, args.rows, kde=not args.no_kde, k=args.k)
            splits.append(s)
            a = s["aupc"]
            print(f"{name} seed {seed} (k = {s['k']}): " + ", ".join(f"{m} {a[m]:.3f}" for m in a)
                  + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        summ = summarise(name, splits)
        for s in splits:  # keep the JSON small: per-row arrays become lists
            for key in ("row_aupc", "row_aupc_hard", "row_aupc_kde"):
                if key in s:
                    s[key] = {m: [round(float(v), 6) for v in arr] for m, arr in s[key].items()}
        results["datasets"][name] = {"splits": splits, "summary": summ}
        print(f"\n== {name}: {args.seeds} stratified splits, first {args.rows} test rows "
              f"({splits[0]['rows']} used), kNN k = {args.k} ({sorted({s['k'] for s in splits})}), mean baseline, soft score, raw AUPC")
        for m, v in sorted(summ["aupc"].items(), key=lambda kv: kv[1]["mean"]):
            print(f"  {m:<14} {v['mean']:7.3f} ± {v['se']:.3f}   (hard score {summ['aupc_hard'][m]['mean']:7.3f} "
                  f"± {summ['aupc_hard'][m]['se']:.3f})")
        for key in ("soft", "hard", "kde"):
            p = summ.get(f"lrp_minus_kernelshap_{key}")
            if p is None:
                continue
            o = p["over_splits"]
            print(f"  LRP − KernelSHAP ({key}): {o['mean']:+.3f} ± {o['se']:.3f} s.e., corrected 95% CI "
                  f"[{o['ci95_corrected'][0]:+.3f}, {o['ci95_corrected'][1]:+.3f}]; LRP lower in "
                  f"{p['splits_lrp_lower']}/{args.seeds} splits; rows LRP lower/tie/higher "
                  f"{p['rows']['a_lower']}/{p['rows']['tie']}/{p['rows']['a_higher']}")
        sp0 = summ["lrp_minus_kernelshap_soft"]["per_split"][0]
        print(f"  spec split (seed 0): LRP {splits[0]['aupc']['lrp']:.3f}, KernelSHAP {splits[0]['aupc']['kernelshap']:.3f};"
              f" paired Δ {sp0['mean']:+.3f}, row-level 95% CI [{sp0['ci95'][0]:+.3f}, {sp0['ci95'][1]:+.3f}]")
        r = summ["lrp_over_occlusion"]
        print(f"  LRP/occlusion {r['mean']:.3f} ± {r['se']:.3f}; splits meeting ≤ 0.5×occlusion "
              f"{summ['splits_meeting']['lrp_le_half_occlusion']}/{args.seeds}, below KernelSHAP "
              f"{summ['splits_meeting']['lrp_below_kernelshap']}/{args.seeds}")
        if "aupc_kde_normalised" in summ:
            print("  KDE in-painting, normalised AUPC: " + ", ".join(
                f"{m} {v['mean']:.3f} ± {v['se']:.3f}" for m, v in summ["aupc_kde_normalised"].items()))
        if "spearman_vs_exact_shapley" in summ:
            print("  median per-row Spearman with exact Shapley: " + ", ".join(
                f"{m} {v:.2f}" for m, v in summ["spearman_vs_exact_shapley"].items()))
    if args.budget_sweep:
        budgets = [int(b) for b in args.budget_sweep.split(",")]
        print(f"\nKernelSHAP budget sweep (spec split, first {args.sweep_rows} rows):")
        results["budget_sweep"] = {n: budget_sweep(n, budgets, args.sweep_rows) for n in args.datasets}
    if args.tie_check:
        print(f"\nOcclusion ties (spec split, first {args.rows} rows):")
        results["occlusion_ties"] = {n: occlusion_ties(n, args.rows) for n in args.datasets}
    if args.drift:
        print(f"\nNeighbour drift along the flipping order (spec split, first {args.rows} rows):")
        results["neighbour_drift"] = {n: neighbour_drift(n, args.rows) for n in args.datasets}
    results["seconds"] = time.perf_counter() - t0
    print(f"\nmachine: {results['machine']}; {results['seconds']:.0f} s")
    print(f"wrote {write_json(args.json, results)}")


if __name__ == "__main__":
    main()
