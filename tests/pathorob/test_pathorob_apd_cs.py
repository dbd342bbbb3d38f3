"""APD protocol and aggregation; clustering score. Shipped reference results are recomputed from the
reference's raw files when a checkout is available (PATHOROB_REFERENCE)."""

import json

import numpy as np
import pytest
from scipy import stats

from tub_pathorob.apd import PROTOCOLS, aggregate, apd_accuracies, dataset_summary, performance_drops, training_slides
from tub_pathorob.clustering_score import clustering_score, cosine_silhouette, summary_from_aris
from tub_pathorob.results import read_aris
from tub_pathorob.synthetic import PRESETS, synthetic_features
from tubcli.errors import TubError

# Published full-precision values (spec §6; reference results/apd/*/aggregated_summary.json)
PUBLISHED_APD = {
    "uni2h_clsmean": (-0.025484631041522307, 0.005988691894917354, -0.013000844306600206, 0.005580059278859815),
    "phikonv2_clsmean": (-0.07437459069769618, 0.008066200495538354, -0.05003284331638926, 0.007822495898394385),
}
PUBLISHED_CS = {
    ("uni2h_clsmean", "camelyon"): 0.004144209581988567, ("uni2h_clsmean", "tcga"): 0.12819807107855807,
    ("uni2h_clsmean", "tolkach_esca"): 0.8652711175734653, ("phikonv2_clsmean", "camelyon"): -0.9912878789632573,
    ("phikonv2_clsmean", "tcga"): 0.0018400425364248486, ("phikonv2_clsmean", "tolkach_esca"): 0.7708305336778923,
}


def test_training_slide_tables():
    for d, proto in PROTOCOLS.items():
        first = training_slides(d, 0)
        for s in range(proto.n_splits):
            n = training_slides(d, s)
            assert min(n.values()) >= 0 and max(n.values()) <= proto.max_train_slides
            # every class keeps the same number of training slides in every split (only the center mix changes)
            for j in range(len(proto.classes)):
                assert sum(v for (i, jj), v in n.items() if jj == j) == sum(v for (i, jj), v in first.items() if jj == j)
    assert training_slides("camelyon", 3) == {(0, 0): 4, (0, 1): 10, (1, 0): 10, (1, 1): 4}
    assert training_slides("tcga", 6)[(0, 0)] == 8 and training_slides("tcga", 6)[(0, 3)] == 0
    assert training_slides("tcga", 3)[(0, 3)] == 1 and training_slides("tcga", 4)[(1, 2)] == 0


def test_performance_drop_and_aggregate_formula():
    acc = [[0.8, 0.9], [0.8, 0.9], [0.4, 0.45]]
    assert np.allclose(performance_drops(acc), [-0.25, -0.25])
    rng = np.random.default_rng(0)
    raws = {d: {"ID_test_accuracies": (0.8 + 0.05 * rng.random((s, 20))).tolist(),
                "OOD_test_accuracies": (0.7 + 0.05 * rng.random((s, 20))).tolist()} for d, s in (("a", 8), ("b", 7), ("c", 4))}
    agg = aggregate(raws)
    a = [performance_drops(r["ID_test_accuracies"]) for r in raws.values()]
    corr = np.concatenate([x - x.mean() for x in a]) + np.concatenate(a).mean()
    assert agg["apd_id"] == pytest.approx(corr.mean(), abs=1e-15)
    assert agg["ci_id"] == pytest.approx(stats.t.ppf(0.975, 60) * corr.std(ddof=1) / np.sqrt(60), abs=1e-15)


def test_apd_from_shipped_raw_files(reference_repo):
    from tub_pathorob.apd import read_raw

    for model, (apd_id, ci_id, apd_ood, ci_ood) in PUBLISHED_APD.items():
        folder = reference_repo / "results" / "apd" / model
        raws = dict(read_raw(folder / f"{d}_raw.json") for d in ("camelyon", "tcga", "tolkach_esca"))
        agg = aggregate(raws)
        for got, want in ((agg["apd_id"], apd_id), (agg["ci_id"], ci_id), (agg["apd_ood"], apd_ood), (agg["ci_ood"], ci_ood)):
            assert abs(got - want) <= 1e-12
        for d, raw in raws.items():
            shipped = json.loads((folder / f"{d}_summary.json").read_text())
            mine = dataset_summary(raw)
            assert abs(mine["apd_id"] - shipped["apd_id"]) <= 1e-12
            assert abs(mine["apd_ood"] - shipped["apd_ood"]) <= 1e-12


def test_cs_from_shipped_aris(reference_repo):
    for (model, d), cs in PUBLISHED_CS.items():
        folder = reference_repo / "results" / "clustering_score" / model / d
        shipped = json.loads((folder / "results_summary.json").read_text())
        mine = summary_from_aris(read_aris(folder / "aris.csv"), shipped["num_combinations"])
        assert abs(mine["clustering_score_mean"] - cs) <= 1e-12
        assert abs(mine["clustering_score_mean_std"] - shipped["clustering_score_mean_std"]) <= 1e-12


def test_apd_rejects_wrong_protocol():
    X, meta = synthetic_features(slides_per_cell=2, tiles_per_slide=5)
    with pytest.raises(TubError, match="not in the camelyon APD protocol"):
        apd_accuracies(X, meta, "camelyon", 1)
    with pytest.raises(TubError, match="defined for"):
        apd_accuracies(X, meta, "custom", 1)


def test_apd_tcga_pipeline_runs():
    X, meta = synthetic_features(design=PRESETS["tcga_4x4"], dim=4, bio=0.4, center=1.0, slide=0.2, seed=3)
    raw = apd_accuracies(X, meta, "tcga", iterations=1)
    assert np.asarray(raw["ID_test_accuracies"]).shape == (7, 1)
    s = dataset_summary(raw)
    assert -1 < s["apd_ood"] < 0.05 and all(0.4 < a < 1.0 for a in s["ID_test_accuracy_means"])


def test_clustering_score_signs():
    kw = dict(classes=("a", "b"), centers=("x", "y"), slides_per_cell=3, tiles_per_slide=25, slide=0.0, noise=0.3)
    X, meta = synthetic_features(bio=2.0, center=0.0, seed=1, **kw)
    assert clustering_score(X, meta, K=2, trials=3).summary["clustering_score_mean"] > 0.9
    X, meta = synthetic_features(bio=0.0, center=2.0, seed=1, **kw)
    assert clustering_score(X, meta, K=2, trials=3).summary["clustering_score_mean"] < -0.9
    res = clustering_score(X, meta, min_k=2, max_k=4, trials=2)
    assert res.summary["Ks"]["min"] >= 2 and len(res.silhouettes) == 3 and res.summary["num_combinations"] == 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_closed_form_cosine_silhouette_equals_scikit_learn(dtype):
    """The O(N·K·D) silhouette against scikit-learn's pairwise one, incl. unnormalised rows and a singleton."""
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(3)
    X = (rng.normal(size=(400, 12)) + 2.0 * rng.integers(0, 3, 400)[:, None]).astype(dtype)
    for labels in (rng.integers(0, 2, 400), rng.integers(0, 9, 400), np.r_[np.zeros(399, int), [5]]):
        expected = silhouette_score(X, labels, metric="cosine")
        assert abs(cosine_silhouette(X, labels) - expected) <= (1e-12 if dtype == np.float64 else 1e-6)
    with pytest.raises(TubError, match="clusters"):
        cosine_silhouette(X, np.zeros(400, int))


# Reference figures: official PathoROB (46594e9) apd.compute / clustering_score.compute on the same synthetic
# features, produced with
#   PYTHONPATH=plugins/tub-pathorob:. python benchmarks/pathorob_parity.py --reference-repo /tmp/ref-pathorob \
#       --reference-python /tmp/pathorob-ref-venv/bin/python --datasets --cs --apd camelyon tcga
REFERENCE_APD = {"camelyon": (-0.04846979012128588, -0.04589155727898525),
                 "tcga": (-0.055091562851344866, -0.06852213493324627)}
REFERENCE_CS = {"clustering_score_mean": -0.9742436130383266, "Ks": {"min": 2, "median": 2.0, "max": 2}}


def _parity_module():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "pathorob_parity", Path(__file__).parents[2] / "benchmarks" / "pathorob_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cs_parity_with_reference_recorded():
    mod = _parity_module()
    X, meta = mod.make_cs_case()
    s = clustering_score(X, meta, max_k=mod.CS_CASE["max_k"], trials=mod.CS_CASE["trials"]).summary
    assert abs(s["clustering_score_mean"] - REFERENCE_CS["clustering_score_mean"]) <= 1e-12
    assert s["Ks"] == REFERENCE_CS["Ks"]


@pytest.mark.parametrize("dataset", ["camelyon", "tcga"])
def test_apd_parity_with_reference_recorded(dataset):
    mod = _parity_module()
    X, meta = mod.make_apd_case(dataset)
    s = dataset_summary(apd_accuracies(X, meta, dataset, iterations=2))
    assert abs(s["apd_id"] - REFERENCE_APD[dataset][0]) <= 1e-9
    assert abs(s["apd_ood"] - REFERENCE_APD[dataset][1]) <= 1e-9


def test_apd_refuses_rows_whose_blocks_are_not_one_slide():
    """APD takes each run of T rows of a cell as one slide. Metadata sorted by tile instead of slide used to
    run, mixing slides across the train/test split (tiles of one slide on both sides)."""
    from tub_pathorob.metadata import Metadata

    X, meta = synthetic_features(design=PRESETS["tcga_4x4"], dim=4, seed=3)
    order = np.array(sorted(range(len(meta)), key=lambda r: (meta.patch_id[r], meta.slide_id[r])))  # by tile
    shuffled = Metadata({k: v[order] for k, v in meta.columns.items()}, "m.csv")
    with pytest.raises(TubError, match="share one block of 30 consecutive rows"):
        apd_accuracies(X[order], shuffled, "tcga", iterations=1)
    cols = {k: v.copy() for k, v in meta.columns.items()}
    first = cols["slide_id"][0]
    cols["slide_id"][cols["slide_id"] == cols["slide_id"][30]] = first  # one slide of 60 tiles
    with pytest.raises(TubError, match=f"slide '{first}' fills more than one block"):
        apd_accuracies(X, Metadata(cols, "m.csv"), "tcga", iterations=1)


def test_pathorob_clustering_std_is_sample_std_over_trials():
    from tub_pathorob.clustering_score import clustering_score
    from tub_pathorob.synthetic import synthetic_features
    X, meta = synthetic_features(slides_per_cell=2, tiles_per_slide=10, bio=0.2, center=0.2, seed=1)
    res = clustering_score(X, meta, K=3, trials=4)
    by = {}
    for name, _, _, _, cs in res.aris:
        by.setdefault(name, []).append(cs)
    want = np.mean([np.std(v, ddof=1) for v in by.values()])
    assert want > 0 and res.summary["clustering_score_mean_std"] == pytest.approx(want)
