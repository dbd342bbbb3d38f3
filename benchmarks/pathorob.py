"""Benchmark: tub-pathorob vs the official PathoROB code, robustness index on the same 20,400-row features.

Both read the same official layout (one npz per center + camelyon metadata CSV) and compute the
camelyon robustness index (k = 11, and the k search), once without the logistic-regression AUC
("RI core") and once with it (the reference then also fits two further AUCs it does not report).
Each side runs in a fresh interpreter per round (the reference needs pandas); its time is measured
inside that process after the imports, around reading the features and computing the index. Both run
under the same native thread limit.

The box this runs on is shared, so the two are interleaved: every round runs tub, the reference and
tub again back to back and gives one ratio, reference time / mean of the two tub times (the two tub
runs bracket the reference, so load that drifts during the round weighs on both sides alike); the
table reports the median of the per-round ratios with their min and max, the median times, the
1-minute load average seen during the rounds, and whether every run gave the identical robustness index
and k_opt.

    PYTHONPATH=plugins/tub-pathorob:. python benchmarks/pathorob.py --reference-repo /tmp/ref-pathorob \
        --reference-python /tmp/pathorob-ref-venv/bin/python --threads 1 --rounds 5 --out runs/benchmarks/pathorob.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tub_pathorob.features import write_official
from tub_pathorob.synthetic import PRESETS, synthetic_features

REF = r"""
import json, sys, time, io, contextlib
sys.path.insert(0, {repo!r})
import pathorob.robustness_index.robustness_index as R
if not {auc}:
    R.compute_prediction_metrics = lambda *a, **k: None   # skip the three logistic-regression AUCs
from threadpoolctl import threadpool_limits
ctx = threadpool_limits(limits={threads}) if {threads} > 0 else contextlib.nullcontext()
with ctx, contextlib.redirect_stdout(io.StringIO()):
    t = time.perf_counter()
    R.compute("bench", "camelyon", features_dir={features!r}, metadata_dir={metadata!r}, results_dir={results!r},
              figures_subdir={results!r}, k_opt_param={k_param}, num_workers=2, plot_graphs=False)
    dt = time.perf_counter() - t
import pathlib
print(json.dumps({{"seconds": dt, "summary": json.load(open(next(pathlib.Path({results!r}).rglob("results_summary.json"))))}}))
"""


TUB = r"""
import json, sys, time, contextlib
sys.path.insert(0, {plugin!r})
from tub_pathorob.features import load_features
from tub_pathorob.metadata import read_metadata
from tub_pathorob.robustness_index import robustness_index
from tub_pathorob.threads import limit_threads
import sklearn.linear_model, sklearn.model_selection, sklearn.preprocessing  # imported before timing, as the reference's
with limit_threads({threads}):
    t = time.perf_counter()
    X, meta = load_features({features!r}, read_metadata({metadata!r}))
    res = robustness_index(X, meta, dataset="camelyon", k_search={k_search}, auc={auc}).summary
    dt = time.perf_counter() - t
print(json.dumps({{"seconds": dt, "summary": res}}))
"""

CASES = {
    "k11": ("RI core, k=11", 0, False),
    "ksearch": ("RI core, k search", -1, False),
    "auc": ("RI + AUC, k=11", 0, True),
}


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-repo", required=True)
    ap.add_argument("--reference-python", default=sys.executable)
    ap.add_argument("--threads", type=int, default=1, help="native thread limit for both (0 = library default)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved reference/tub rounds per case (>= 3)")
    ap.add_argument("--cases", default="k11,ksearch,auc", help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--out", type=Path, default=Path("runs/benchmarks/pathorob.json"))
    a = ap.parse_args(argv)
    plugin = str(Path(__file__).resolve().parents[1] / "plugins" / "tub-pathorob")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        X, meta = synthetic_features(design=PRESETS["camelyon"], bio=0.5, center=0.5, slide=0.3, seed=0)
        write_official(root / "features" / "bench" / "camelyon", X, meta)
        (root / "metadata").mkdir()
        meta.write_csv(root / "metadata" / "camelyon.csv")
        n_id = int((meta.subset == "ID").sum())
        for name in a.cases.split(","):
            label, k_param, auc = CASES[name]
            rounds = []
            for rnd in range(a.rounds):
                ref_code = REF.format(repo=a.reference_repo, auc=auc, threads=a.threads,
                                      features=str(root / "features"), metadata=str(root / "metadata"),
                                      results=str(root / f"res_{name}_{rnd}"), k_param=k_param)
                tub_code = TUB.format(plugin=plugin, threads=a.threads,
                                      features=str(root / "features" / "bench" / "camelyon"),
                                      metadata=str(root / "metadata" / "camelyon.csv"), k_search=k_param == -1, auc=auc)
                # tub, reference, tub: the mean of the two tub runs sees the same load drift as the reference
                load = [os.getloadavg()[0]]
                tub1 = _run([sys.executable, "-c", tub_code])
                load.append(os.getloadavg()[0])
                ref = _run([a.reference_python, "-c", ref_code])
                load.append(os.getloadavg()[0])
                tub = _run([sys.executable, "-c", tub_code])
                load.append(os.getloadavg()[0])
                r, t = ref["summary"], tub["summary"]
                tub_s = (tub1["seconds"] + tub["seconds"]) / 2
                rec = {"reference_s": ref["seconds"], "tub_s": tub_s, "tub_runs_s": [tub1["seconds"], tub["seconds"]],
                       "ratio": ref["seconds"] / tub_s, "load_1min": load, "k_opt": [r["k_opt"], t["k_opt"]],
                       "robustness_index": [r["robustness_index"], t["robustness_index"]],
                       "identical": (r["robustness_index"] == t["robustness_index"] == tub1["summary"]["robustness_index"]
                                     and r["k_opt"] == t["k_opt"])}
                if auc:
                    rec["abs_diff_auc"] = abs(t["confounder_log_reg_AUC"] - r["confounder_log_reg_AUC"])
                rounds.append(rec)
                print(f"{label:20s} round {rnd + 1}: reference {rec['reference_s']:6.2f}s  tub {rec['tub_s']:5.2f}s  "
                      f"x{rec['ratio']:.1f}  load {max(load):.1f}  identical {rec['identical']}", flush=True)
            ratios = [x["ratio"] for x in rounds]
            rows.append({
                "case": label, "rows": n_id, "rounds": rounds,
                "reference_s_median": statistics.median(x["reference_s"] for x in rounds),
                "tub_s_median": statistics.median(x["tub_s"] for x in rounds),
                "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                "k_opt": rounds[0]["k_opt"], "robustness_index": rounds[0]["robustness_index"][1],
                "abs_diff_ri_max": max(abs(x["robustness_index"][0] - x["robustness_index"][1]) for x in rounds),
                "identical_all_rounds": all(x["identical"] for x in rounds),
                "load_1min_range": [min(min(x["load_1min"]) for x in rounds), max(max(x["load_1min"]) for x in rounds)],
            })
    result = {"machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cpus)", "threads": a.threads,
              "python": platform.python_version(), "rounds": a.rounds, "results": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print("| case | rows | reference (s, median) | tub (s, median) | speed-up median (min–max) | k_opt ref / tub "
          "| identical RI | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['rows']:,} | {r['reference_s_median']:.2f} | {r['tub_s_median']:.2f} | "
              f"**{r['speedup_median']:.1f}×** ({r['speedup_min']:.1f}–{r['speedup_max']:.1f}) | "
              f"{r['k_opt'][0]} / {r['k_opt'][1]} | {'yes' if r['identical_all_rounds'] else 'NO'} "
              f"(\\|Δ\\| {r['abs_diff_ri_max']:.0e}) | {r['load_1min_range'][0]:.1f}–{r['load_1min_range'][1]:.1f} |")
    return result


if __name__ == "__main__":
    main()
