"""Benchmark: tub-pathorob vs the official PathoROB code, robustness index on the same 20,400-row features.

Both read the same official layout (one npz per center + camelyon metadata CSV) and compute the
camelyon robustness index (k = 11, and the k search), once without the logistic-regression AUC
("RI core") and once with it (the reference then also fits two further AUCs it does not report).
Each side runs in a fresh interpreter per repeat (the reference needs pandas); its time is measured
inside that process after the imports, around reading the features and computing the index. Both run
under the same native thread limit; the minimum over the repeats is reported.

    PYTHONPATH=plugins/tub-pathorob:. python benchmarks/pathorob.py --reference-repo /tmp/ref-pathorob \
        --reference-python /tmp/pathorob-ref-venv/bin/python --threads 1 --repeats 3 --out runs/benchmarks/pathorob.json
"""

from __future__ import annotations

import argparse
import json
import platform
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-repo", required=True)
    ap.add_argument("--reference-python", default=sys.executable)
    ap.add_argument("--threads", type=int, default=1, help="native thread limit for both (0 = library default)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/benchmarks/pathorob.json"))
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        X, meta = synthetic_features(design=PRESETS["camelyon"], bio=0.5, center=0.5, slide=0.3, seed=0)
        write_official(root / "features" / "bench" / "camelyon", X, meta)
        (root / "metadata").mkdir()
        meta.write_csv(root / "metadata" / "camelyon.csv")
        n_id = int((meta.subset == "ID").sum())
        for label, k_param, auc in (("RI core, k=11", 0, False), ("RI core, k search", -1, False),
                                    ("RI + AUC, k=11", 0, True)):
            ref_t, tub_t = [], []
            for rep in range(a.repeats):
                code = REF.format(repo=a.reference_repo, auc=auc, threads=a.threads, features=str(root / "features"),
                                  metadata=str(root / "metadata"), results=str(root / f"res_{k_param}_{auc}_{rep}"),
                                  k_param=k_param)
                out = subprocess.run([a.reference_python, "-c", code], capture_output=True, text=True, check=True)
                ref = json.loads(out.stdout.strip().splitlines()[-1])
                ref_t.append(ref["seconds"])
                # tub also runs in a fresh interpreter, timed after its imports, exactly like the reference
                code = TUB.format(plugin=str(Path(__file__).resolve().parents[1] / "plugins" / "tub-pathorob"),
                                  threads=a.threads, features=str(root / "features" / "bench" / "camelyon"),
                                  metadata=str(root / "metadata" / "camelyon.csv"), k_search=k_param == -1, auc=auc)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                tub = json.loads(out.stdout.strip().splitlines()[-1])
                tub_t.append(tub["seconds"])
                res = tub["summary"]
            diff = abs(res["robustness_index"] - ref["summary"]["robustness_index"])
            row = {"case": label, "rows": n_id, "reference_s": min(ref_t), "tub_s": min(tub_t),
                   "speedup": min(ref_t) / min(tub_t), "k_opt": [ref["summary"]["k_opt"], res["k_opt"]],
                   "robustness_index": res["robustness_index"], "abs_diff_ri": diff}
            if auc:
                row["abs_diff_auc"] = abs(res["confounder_log_reg_AUC"] - ref["summary"]["confounder_log_reg_AUC"])
            rows.append(row)
            print(f"{label:20s} rows {n_id}  reference {min(ref_t):7.2f}s  tub {min(tub_t):6.2f}s  "
                  f"x{row['speedup']:.1f}  k_opt {row['k_opt']}  |dRI| {diff:.1e}", flush=True)
    result = {"machine": f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cpus)",
              "threads": a.threads, "python": platform.python_version(), "results": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print("| case | rows | reference (s) | tub (s) | speed-up | |ΔRI| |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['rows']} | {r['reference_s']:.2f} | {r['tub_s']:.2f} | {r['speedup']:.1f}× | {r['abs_diff_ri']:.1e} |")
    return result


if __name__ == "__main__":
    main()
