"""Parity of tub-pathorob with the official PathoROB code on identical synthetic features.

Writes the synthetic data in the official layout (features/<model>/<dataset>/<center>.npz +
metadata/<name>.csv), runs the reference in a separate interpreter (it needs pandas), runs tub in
this process, and prints/writes both values per key.

    python benchmarks/pathorob_parity.py --reference-repo /tmp/ref-pathorob \
        --reference-python /tmp/pathorob-ref-venv/bin/python --k-search --cs --apd camelyon tcga \
        --shipped-ri --real-metadata /tmp/ref-pathorob/data/metadata --out runs/benchmarks/pathorob_parity.json

The reference repository is a checkout of bifold-pathomics/PathoROB (46594e9) outside this project.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tub_pathorob.features import write_official
from tub_pathorob.synthetic import PRESETS, paired_subsets, synthetic_features

MODEL = "synth"

# dataset -> (metadata file the reference reads, preset, synthetic signal, seed)
CASES = {
    "camelyon": ("camelyon", "camelyon", dict(bio=0.5, center=0.5, slide=0.3), 0),
    "tolkach_esca": ("tolkach_esca_reduced", "tolkach_esca_reduced", dict(bio=0.6, center=0.5, slide=0.3), 1),
    "tcga": ("tcga_2x2", "tcga_4x4", dict(bio=0.4, center=0.4, slide=0.3), 2),
}


def make_case(dataset: str):
    """Deterministic features + metadata of one parity case (tcga: paired substitute from tcga_4x4)."""
    meta_name, preset, signal, seed = CASES[dataset]
    X, meta = synthetic_features(design=PRESETS[preset], seed=seed, **signal)
    if dataset == "tcga":
        paired, index = paired_subsets(meta)
        return X, meta, paired, index  # features keyed by slide-patch: written once from the grid
    return X, meta, meta, None


def write_case(root: Path, dataset: str) -> None:
    X, grid_meta, meta, _ = make_case(dataset)
    write_official(root / "features" / MODEL / dataset, X, grid_meta)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    meta.write_csv(root / "metadata" / f"{CASES[dataset][0]}.csv")
    if dataset == "tcga":
        grid_meta.write_csv(root / "metadata" / "tcga_4x4.csv")


REF_SNIPPET = r"""
import json, sys, time, io, contextlib
sys.path.insert(0, {repo!r})
from pathorob.robustness_index.robustness_index import compute
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    compute({model!r}, {dataset!r}, features_dir={features!r}, metadata_dir={metadata!r},
            results_dir={results!r}, figures_subdir={results!r} + "/fig", k_opt_param={k_opt_param},
            paired_evaluation={paired}, num_workers=2, plot_graphs=False)
dt = time.perf_counter() - t
import pathlib
p = next(pathlib.Path({results!r}).rglob("results_summary.json"))
print(json.dumps({{"seconds": dt, "summary": json.load(open(p))}}))
"""


def run_reference(python: str, repo: str, root: Path, dataset: str, k_opt_param: int, paired=None) -> dict:
    results = root / f"results_{dataset}_{k_opt_param}_{paired}"
    code = REF_SNIPPET.format(repo=repo, model=MODEL, dataset=dataset, features=str(root / "features"),
                              metadata=str(root / "metadata"), results=str(results), k_opt_param=k_opt_param,
                              paired=paired)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_tub(dataset: str, k_search: bool, paired=None) -> tuple[dict, float]:
    from tub_pathorob.robustness_index import robustness_index

    X, grid_meta, meta, index = make_case(dataset)
    Xm = X if index is None else X[index]
    t = time.perf_counter()
    r = robustness_index(Xm, meta, dataset=dataset, k_search=k_search, paired=paired)
    return r.summary, time.perf_counter() - t


APD_SNIPPET = r"""
import json, sys, time, io, contextlib, pathlib
sys.path.insert(0, {repo!r})
from pathorob.apd.apd import compute
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    compute({model!r}, {dataset!r}, features_dir={features!r}, metadata_dir={metadata!r},
            results_dir={results!r}, iterations={iterations})
dt = time.perf_counter() - t
raw = json.load(open(pathlib.Path({results!r}) / {model!r} / ({dataset!r} + "_raw.json")))
summ = json.load(open(pathlib.Path({results!r}) / {model!r} / ({dataset!r} + "_summary.json")))
print(json.dumps({{"seconds": dt, "raw": raw, "summary": summ}}))
"""

CS_SNIPPET = r"""
import json, sys, time, io, contextlib
sys.path.insert(0, {repo!r})
from pathorob.clustering_score.clustering_score import compute
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    res = compute({model!r}, {dataset!r}, features_dir={features!r}, metadata_dir={metadata!r},
                  results_dir={results!r}, maxK={max_k}, num_trials={trials}, overwrite_results=True)
print(json.dumps({{"seconds": time.perf_counter() - t, "summary": res}}))
"""

APD_DIM = 16  # feature dimension of the APD parity data (keeps 2 x 2 iterations of probes short)
CS_CASE = dict(preset="camelyon_reduced", signal=dict(bio=0.5, center=0.5, slide=0.3), seed=4, max_k=10, trials=5)


def make_apd_case(dataset: str):
    preset = {"camelyon": "camelyon", "tcga": "tcga_4x4"}[dataset]
    return synthetic_features(design=PRESETS[preset], dim=APD_DIM, bio=0.3, center=0.3, slide=0.3, seed=10)


def make_cs_case(preset: str = CS_CASE["preset"]):
    return synthetic_features(design=PRESETS[preset], seed=CS_CASE["seed"], **CS_CASE["signal"])


def run_apd(python, repo, root: Path, dataset: str, iterations: int) -> dict:
    from tub_pathorob.apd import apd_accuracies, dataset_summary

    X, meta = make_apd_case(dataset)
    write_official(root / "features" / "apd" / dataset, X, meta)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    meta.write_csv(root / "metadata" / ("camelyon.csv" if dataset == "camelyon" else "tcga_4x4.csv"))
    code = APD_SNIPPET.format(repo=repo, model="apd", dataset=dataset, features=str(root / "features"),
                              metadata=str(root / "metadata"), results=str(root / "apd_results"), iterations=iterations)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    t = time.perf_counter()
    raw = apd_accuracies(X, meta, dataset, iterations)
    dt = time.perf_counter() - t
    tub = dataset_summary(raw)
    diff = max(abs(a - b) for k in ("ID_test_accuracies", "OOD_test_accuracies")
               for ra, rb in zip(raw[k], ref["raw"][k]) for a, b in zip(ra, rb))
    print(f"APD {dataset}: apd_id ref {ref['summary']['apd_id']!r} tub {tub['apd_id']!r}; apd_ood ref "
          f"{ref['summary']['apd_ood']!r} tub {tub['apd_ood']!r}; max|acc diff| {diff:.3g}; "
          f"time ref {ref['seconds']:.1f}s tub {dt:.1f}s", flush=True)
    return {"metric": "apd", "dataset": dataset, "iterations": iterations, "reference": ref["summary"], "tub": tub,
            "max_abs_accuracy_diff": diff, "reference_seconds": ref["seconds"], "tub_seconds": dt}


def run_cs(python, repo, root: Path, preset: str, max_k: int, trials: int) -> dict:
    """Clustering score and every silhouette; the reference always reads ``camelyon_reduced.csv``."""
    from tub_pathorob.clustering_score import clustering_score

    X, meta = make_cs_case(preset)
    write_official(root / "features" / "cs" / "camelyon", X, meta)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    meta.write_csv(root / "metadata" / "camelyon_reduced.csv")
    code = CS_SNIPPET.format(repo=repo, model="cs", dataset="camelyon", features=str(root / "features"),
                             metadata=str(root / "metadata"), results=str(root / "cs_results"),
                             max_k=max_k, trials=trials)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    t = time.perf_counter()
    res = clustering_score(X, meta, max_k=max_k, trials=trials)
    dt = time.perf_counter() - t
    tub = res.summary
    ref_sil = {}
    for path in (root / "cs_results").rglob("silhouette_scores.csv"):
        for line in path.read_text().splitlines()[1:]:
            name, k, value = line.split(",")
            ref_sil[(name, int(k))] = float(value)
    sil_diff = max(abs(ref_sil[(name, k)] - value) for name, k, value in res.silhouettes)
    print(f"CS {preset} ({len(X)} rows, K<={max_k}, {trials} trials): ref {ref['summary']['clustering_score_mean']!r} K {ref['summary']['Ks']} tub "
          f"{tub['clustering_score_mean']!r} K {tub['Ks']}; silhouettes ({len(res.silhouettes)}) max|diff| "
          f"{sil_diff:.3g}; time ref {ref['seconds']:.1f}s tub {dt:.1f}s", flush=True)
    return {"metric": "clustering_score", "dataset": preset, "max_k": max_k, "trials": trials, "reference": ref["summary"], "tub": tub,
            "max_abs_silhouette_diff": sil_diff, "reference_seconds": ref["seconds"], "tub_seconds": dt}


def run_real_metadata(python, repo, root: Path, dataset: str, metadata_dir: Path) -> dict:
    """Official metadata CSV (real slide ids, tile counts, OOD rows) with synthetic features."""
    from tub_pathorob.metadata import read_metadata
    from tub_pathorob.robustness_index import robustness_index
    from tub_pathorob.synthetic import features_for_metadata

    name = CASES[dataset][0]
    meta = read_metadata(metadata_dir / f"{name}.csv")
    X = features_for_metadata(meta, bio=0.4, center=0.4, seed=21)
    rroot = root / f"real_{dataset}"
    write_official(rroot / "features" / MODEL / dataset, X, meta)
    (rroot / "metadata").mkdir(parents=True, exist_ok=True)
    meta.write_csv(rroot / "metadata" / f"{name}.csv")
    ref = run_reference(python, repo, rroot, dataset, 0)
    t = time.perf_counter()
    tub = robustness_index(X, meta, dataset=dataset).summary
    dt = time.perf_counter() - t
    diffs = {k: abs(tub[k] - v) for k, v in ref["summary"].items() if isinstance(v, (int, float))}
    print(f"real {name:22s} rows {len(meta)} RI ref {ref['summary']['robustness_index']!r} tub {tub['robustness_index']!r} "
          f"max|diff| {max(diffs.values()):.3g} time ref {ref['seconds']:.1f}s tub {dt:.1f}s", flush=True)
    return {"metric": "ri_real_metadata", "dataset": dataset, "metadata": name, "reference": ref["summary"],
            "tub": tub, "abs_diff": diffs, "reference_seconds": ref["seconds"], "tub_seconds": dt}


SHIPPED_RI = r"""
# runs in the reference interpreter: the shipped curves are a pickle (never written or read by tub itself)
import pickle, json, csv, sys
import numpy as np
from pathlib import Path
out = []
for f in sorted(Path({repo!r}, "results", "robustness_index").glob("*/*/-1_0")):
    st = pickle.load(open(f / "frequencies-same-class.pkl", "rb"))["stats"]
    summ = json.load(open(f / "results_summary.json"))
    k = summ["k_opt"]
    # fraction_X-cum-norm are the pooled cumulative counts C_X(k) / sum_X C_X(k): RI is scale-free
    SO, OS = np.asarray(st["fraction_SO-cum-norm"]), np.asarray(st["fraction_OS-cum-norm"])
    SS, OO = np.asarray(st["fraction_SS-cum-norm"]), np.asarray(st["fraction_OO-cum-norm"])
    ri = SO[k - 1] / (SO[k - 1] + OS[k - 1])
    gi = (SS[k-1] * SO[k-1] + SO[k-1] * OS[k-1]) / (SS[k-1] * SO[k-1] + SS[k-1] * OO[k-1])
    out.append({{"model": f.parts[-3], "dataset": f.parts[-2], "k_opt": k, "published_ri": summ["robustness_index"],
                "recomputed_ri": float(ri), "abs_diff_ri": abs(float(ri) - summ["robustness_index"]),
                "abs_diff_generalization_index": abs(float(gi) - summ["generalization_index"])}})
print(json.dumps(out))
"""


def run_shipped_ri(python, repo) -> list[dict]:
    code = SHIPPED_RI.format(repo=repo)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows:
        print(f"shipped RI {r['model']:18s} {r['dataset']:13s} k {r['k_opt']:3d} published {r['published_ri']!r} "
              f"recomputed {r['recomputed_ri']!r} |diff| {r['abs_diff_ri']:.1e}", flush=True)
    return [{"metric": "ri_shipped", **r} for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-repo", required=True)
    ap.add_argument("--reference-python", default=sys.executable)
    ap.add_argument("--datasets", nargs="*", default=list(CASES))
    ap.add_argument("--k-search", action="store_true", help="also compare the k search (official --k_opt_param -1)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--apd", nargs="*", default=[], help="also compare APD on these datasets (camelyon, tcga)")
    ap.add_argument("--apd-iterations", type=int, default=2)
    ap.add_argument("--real-metadata", type=Path, default=None,
                    help="the reference's data/metadata folder: also compare RI on the official CSVs (camelyon, tolkach)")
    ap.add_argument("--shipped-ri", action="store_true",
                    help="recompute the published RI from the reference's shipped curves (in the reference interpreter)")
    ap.add_argument("--cs", action="store_true", help="also compare the clustering score and its silhouettes")
    ap.add_argument("--cs-preset", choices=["camelyon_reduced", "camelyon"], default=CS_CASE["preset"],
                    help="synthetic design of the clustering case (camelyon: 20,400 ID rows)")
    ap.add_argument("--cs-max-k", type=int, default=CS_CASE["max_k"])
    ap.add_argument("--cs-trials", type=int, default=CS_CASE["trials"])
    a = ap.parse_args(argv)
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in a.datasets:
            write_case(root, d)
            modes = [(0, False)] + ([(-1, True)] if a.k_search else [])
            for k_param, search in modes:
                ref = run_reference(a.reference_python, a.reference_repo, root, d, k_param)
                tub, dt = run_tub(d, search)
                diffs = {k: abs(tub[k] - v) for k, v in ref["summary"].items() if isinstance(v, (int, float))}
                row = {"dataset": d, "k_opt_param": k_param, "reference": ref["summary"], "tub": tub,
                       "abs_diff": diffs, "reference_seconds": ref["seconds"], "tub_seconds": dt}
                report.append(row)
                print(f"{d:14s} k_param={k_param:3d} k_opt ref/tub {ref['summary']['k_opt']}/{tub['k_opt']} "
                      f"RI ref {ref['summary']['robustness_index']!r} tub {tub['robustness_index']!r} "
                      f"max|diff| {max(diffs.values()):.3g}  time ref {ref['seconds']:.1f}s tub {dt:.1f}s", flush=True)
        if a.shipped_ri:
            report += run_shipped_ri(a.reference_python, a.reference_repo)
        if a.real_metadata:
            for d in ("tolkach_esca", "camelyon"):
                report.append(run_real_metadata(a.reference_python, a.reference_repo, root, d, a.real_metadata))
        if a.cs:
            report.append(run_cs(a.reference_python, a.reference_repo, root, a.cs_preset, a.cs_max_k, a.cs_trials))
        for d in a.apd:
            report.append(run_apd(a.reference_python, a.reference_repo, root, d, a.apd_iterations))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
