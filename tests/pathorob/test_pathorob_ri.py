"""Robustness index: analytic cases, an independent loop implementation, and recorded parity with
the official PathoROB code on identical synthetic features."""

import numpy as np
import pytest

from tub_pathorob.metadata import Metadata
from tub_pathorob.robustness_index import (DEFAULT_K, k_candidates, metrics_from_counts, robustness_index,
                                           shuffle_and_reduce)
from tub_pathorob.synthetic import paired_subsets, synthetic_features
from tubcli.errors import TubError


def naive_counts(X, meta, k):
    """Spec §2.2 steps 1–5 written as plain loops over queries (no shared code with the module)."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    D = ((Xn[:, None, :] - Xn[None, :, :]) ** 2).sum(-1)
    slides, counts = np.unique(meta.slide_id, return_counts=True)
    n_nb = min(k + counts.max(), len(X))  # neighbours queried: k + largest slide
    rows = []
    for i in range(len(X)):
        order = np.argsort(D[i], kind="stable")[:n_nb]
        rows.append([j for j in order if meta.slide_id[j] != meta.slide_id[i]])
    m = min(len(r) for r in rows)
    C = np.zeros(4)
    for i, r in enumerate(rows):
        for j in r[:k]:
            sb = meta.biological_class[j] == meta.biological_class[i]
            sc = meta.medical_center[j] == meta.medical_center[i]
            C[0 if sb and sc else 1 if sb else 2 if sc else 3] += 1
    return C, m


def test_ri_matches_independent_loop_implementation():
    X, meta = synthetic_features(classes=("a", "b", "c"), centers=("x", "y"), slides_per_cell=2, tiles_per_slide=8,
                                 dim=8, bio=0.4, center=0.4, seed=5)
    r = robustness_index(X, meta, k=7, auc=False)
    C, m = naive_counts(X, meta, 7)
    assert r.summary["robustness_index"] == pytest.approx(C[1] / (C[1] + C[2]), abs=1e-12)
    assert r.summary["ID_performance"] == pytest.approx(C[0] / (C[0] + C[2]), abs=1e-12)
    assert r.summary["OOD_performance"] == pytest.approx(C[1] / (C[1] + C[3]), abs=1e-12)
    assert r.summary["prediction_performance"] == pytest.approx((C[0] + C[1]) / C.sum(), abs=1e-12)
    assert len(r.curves["robustness_index"]) == m  # truncation to the shortest remaining row


def test_counts_conserve_neighbours():
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=20, seed=1)
    r = robustness_index(X, meta, k=11, auc=False)
    (_, rows, ns), = r.sets
    counts = ns.category_counts()
    assert np.all(counts.sum(0) == len(rows))  # every query has exactly one category per rank
    assert not np.any(ns.slide[ns.neighbours] == ns.slide[:, None])  # no same-slide neighbour survives


@pytest.mark.parametrize("classes,centers,expected", [(2, 2, 0.5), (6, 3, 2 / 7)])
def test_null_band(classes, centers, expected):
    """a = b = 0: neighbours are random, RI = (C−1)/(C+K−2) (spec §5)."""
    X, meta = synthetic_features(tuple(f"b{i}" for i in range(classes)), tuple(f"c{i}" for i in range(centers)),
                                 slides_per_cell=max(2, 12 // (classes * centers) + 1), tiles_per_slide=40,
                                 bio=0.0, center=0.0, seed=2)
    ri = robustness_index(X, meta, k=11, auc=False).summary["robustness_index"]
    assert abs(ri - expected) < 0.03


def test_signal_directions():
    X, meta = synthetic_features(slides_per_cell=5, tiles_per_slide=40, bio=0.5, center=0.0, seed=3)
    assert robustness_index(X, meta, k=11, auc=False).summary["robustness_index"] >= 0.9
    X, meta = synthetic_features(slides_per_cell=5, tiles_per_slide=40, bio=0.0, center=0.5, seed=3)
    assert robustness_index(X, meta, k=11, auc=False).summary["robustness_index"] <= 0.1


def test_row_permutation_invariance():
    X, meta = synthetic_features(slides_per_cell=4, tiles_per_slide=30, seed=4)
    p = np.random.default_rng(0).permutation(len(X))
    a = robustness_index(X, meta, k=11, auc=False).summary
    b = robustness_index(X[p], meta.take(p), k=11, auc=False).summary
    for key in ("robustness_index", "balanced_accuracy", "ID_performance", "generalization_index"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)


def test_reference_row_order_is_legacy_permutation():
    meta = Metadata.from_columns(slide_id=[str(i) for i in range(50)], patch_id=["0"] * 50,
                                 biological_class=["a"] * 50, medical_center=["x"] * 50)
    np.random.seed(123)
    assert np.array_equal(shuffle_and_reduce(meta), np.random.choice(50, 50, replace=False))


def test_max_patches_per_combi_keeps_first_rows():
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=20, seed=1)
    order = shuffle_and_reduce(meta, 25)
    cells = {}
    for i in order:
        cells[(meta.biological_class[i], meta.medical_center[i])] = cells.get((meta.biological_class[i], meta.medical_center[i]), 0) + 1
    assert set(cells.values()) == {25}


def test_metric_identities():
    counts = np.array([[5, 3, 4], [2, 2, 1], [1, 3, 2], [3, 1, 4]])
    c = metrics_from_counts(counts)
    assert np.allclose(c["generalization_index"], c["OOD_performance"] / c["ID_performance"])
    assert c["normalized_confounder_insensitivity"][-1] == pytest.approx(1.0)


def test_k_search_and_defaults():
    assert list(k_candidates(600)[:7]) == [1, 3, 5, 7, 9, 11, 21] and k_candidates(600)[-1] == 591
    assert DEFAULT_K == {"camelyon": 11, "tcga": 61, "tolkach_esca": 46}
    X, meta = synthetic_features(slides_per_cell=4, tiles_per_slide=30, seed=6)
    r = robustness_index(X, meta, k_search=True, max_k=60, auc=False)
    assert r.summary["k_opt"] == int(r.k_grid[np.argmax(r.bal_acc)])
    assert r.summary["balanced_accuracy"] == pytest.approx(r.bal_acc.max())
    fixed = robustness_index(X, meta, k=r.summary["k_opt"], auc=False).summary
    assert fixed["robustness_index"] == pytest.approx(r.summary["robustness_index"], abs=1e-12)


def test_paired_pools_subsets():
    X, meta = synthetic_features(classes=("a", "b", "c"), centers=("x", "y", "z"), slides_per_cell=3,
                                 tiles_per_slide=15, seed=7)
    paired, index = paired_subsets(meta)
    assert len(set(paired.subset)) == 9
    r = robustness_index(X[index], paired, k=11, paired=True, auc=False)
    assert len(r.sets) == 9
    m = min(ns.m for _, _, ns in r.sets)
    pooled = sum(ns.category_counts()[:, :m] for _, _, ns in r.sets)
    cum = pooled[:, :11].sum(1)
    assert r.summary["robustness_index"] == pytest.approx(cum[1] / (cum[1] + cum[2]), abs=1e-12)
    assert r.summary["balanced_accuracy"] == pytest.approx(np.mean([ns.balanced_accuracies([11])[0] for *_, ns in r.sets]))
    with pytest.raises(TubError, match="paired"):
        robustness_index(X, meta, paired=True, dataset="camelyon")


def test_bootstrap_is_centred_on_ri():
    X, meta = synthetic_features(slides_per_cell=4, tiles_per_slide=30, seed=8)
    r = robustness_index(X, meta, k=11, bootstrap=200, seed=1, auc=False).summary
    assert abs(r["robustness_index-mean"] - r["robustness_index"]) < 3 * r["robustness_index-std"]
    assert 0 < r["robustness_index-std"] < 0.1


def test_confounder_auc_detects_center_signal():
    X, meta = synthetic_features(slides_per_cell=5, tiles_per_slide=20, bio=0.5, center=1.0, seed=9)
    assert robustness_index(X, meta, k=11).summary["confounder_log_reg_AUC"] > 0.95


# Reference figures: official PathoROB (46594e9) `compute(...)` on the same synthetic features, produced with
#   PYTHONPATH=plugins/tub-pathorob:. python benchmarks/pathorob_parity.py --reference-repo /tmp/ref-pathorob \
#       --reference-python /tmp/pathorob-ref-venv/bin/python --k-search   (scikit-learn 1.9.1, numpy 2.4.6)
REFERENCE = {
    ("tolkach_esca", False): {"k_opt": 46, "robustness_index": 0.45157922213521273},
    ("camelyon", False): {"k_opt": 11, "robustness_index": 0.37189563030493555},
    ("camelyon", True): {"k_opt": 81, "robustness_index": 0.36917743915649603},
    ("tcga", False): {"k_opt": 61, "robustness_index": 0.4806078329439185},
}


def _parity_case(dataset):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "pathorob_parity", Path(__file__).parents[2] / "benchmarks" / "pathorob_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    X, _, meta, index = mod.make_case(dataset)
    return (X if index is None else X[index]), meta


@pytest.mark.parametrize("dataset,search", [("tolkach_esca", False), ("camelyon", False)])
def test_parity_with_reference_recorded(dataset, search):
    X, meta = _parity_case(dataset)
    r = robustness_index(X, meta, dataset=dataset, k_search=search, auc=False).summary
    ref = REFERENCE[(dataset, search)]
    assert r["k_opt"] == ref["k_opt"]
    assert abs(r["robustness_index"] - ref["robustness_index"]) <= 1e-9


@pytest.mark.parametrize("dataset,search", [("camelyon", True), ("tcga", False)])
def test_parity_with_reference_recorded_ksearch_paired(dataset, search):
    test_parity_with_reference_recorded(dataset, search)


@pytest.mark.parametrize("n,N", [(40, 600), (595, 600), (600, 600)])
def test_knn_equals_sklearn_brute(n, N):
    from sklearn.neighbors import NearestNeighbors

    from tub_pathorob.knn import nearest_neighbours

    X = np.random.default_rng(n).standard_normal((N, 16))
    ref = NearestNeighbors(n_neighbors=n, algorithm="brute").fit(X).kneighbors(X, return_distance=False)
    got = nearest_neighbours(X, n, block=128)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("N,D,n", [(3001, 64, 111), (2500, 24, 40)])
def test_knn_normalised_near_ties_equal_sklearn_brute(N, D, n):
    """L2-normalised rows (the RI's input: the float32 pass ranks by x·y alone) with clusters of points
    closer than float32 can separate, so the float64 repair of near-tied runs decides their order;
    N is not a multiple of the column-group count, so a remainder group is used."""
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import normalize

    from tub_pathorob.knn import _groups, nearest_neighbours

    rng = np.random.default_rng(N)
    base = rng.standard_normal((N - 300, D))
    near = base[:300] + 1e-7 * rng.standard_normal((300, D))  # near-duplicates of the first 300 rows
    X = normalize(np.concatenate([base, near]))
    G, L = _groups(N, n + 16)
    assert L >= 2 and N % G
    ref = NearestNeighbors(n_neighbors=n, algorithm="brute").fit(X).kneighbors(X, return_distance=False)
    got = nearest_neighbours(X, n, block=96)
    assert np.array_equal(got, ref)
    # the same neighbours after scaling every row (norms no longer equal: the float32 pass subtracts ‖y‖²/2)
    Y = X * rng.uniform(0.5, 2.0, (N, 1))
    ref = NearestNeighbors(n_neighbors=n, algorithm="brute").fit(Y).kneighbors(Y, return_distance=False)
    assert np.array_equal(nearest_neighbours(Y, n, block=96), ref)


def test_knn_exact_with_duplicates_and_ties():
    """Duplicated points make the float32 certificate fail; those queries fall back to exact float64."""
    from tub_pathorob.knn import nearest_neighbours

    rng = np.random.default_rng(1)
    base = rng.standard_normal((150, 8))
    X = np.concatenate([base, base, base[:50] + 1e-12])
    idx = nearest_neighbours(X, 20, block=64)
    d = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    got = np.take_along_axis(d, idx, axis=1)
    want = np.sort(d, axis=1)[:, :20]
    assert np.allclose(got, want, atol=1e-12) and np.all(np.diff(got, axis=1) >= -1e-12)


def test_confounder_auc_is_folded_above_one_half_without_center_signal():
    from tub_pathorob.robustness_index import confounder_auc
    rng = np.random.default_rng(0)
    n_slides, per = 20, 10
    center = np.repeat(np.array(["A", "B"] * (n_slides // 2)), per)
    groups = np.repeat(np.arange(n_slides), per)
    vals = [confounder_auc(rng.normal(size=(n_slides * per, 16)), center, groups) for _ in range(5)]
    assert all(v >= 0.5 for v in vals)  # spec §2.2: fold AUC < 0.5 -> 1 - AUC


def test_pathorob_balanced_accuracy_on_imbalanced_classes():
    from sklearn.metrics import balanced_accuracy_score
    from tub_pathorob.robustness_index import balanced_accuracy
    y = np.array([0] * 8 + [1] * 2)
    p = np.array([0] * 8 + [0, 1])
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))


def test_a_shuffled_dataframe_is_read_by_position_and_checked_as_a_csv():
    """A notebook's DataFrame with a shuffled index gave RI 0.440 for 0.492 with max_patches_per_combi
    (``meta.subset[i]`` looked up index labels); a NaN class or a missing column was a numpy/KeyError."""
    pd = pytest.importorskip("pandas")
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=20, seed=1)
    perm = np.random.default_rng(0).permutation(len(meta))
    df = pd.DataFrame({c: meta.columns[c] for c in meta.columns}).iloc[perm]  # index labels != positions
    want = robustness_index(X[perm], meta.take(perm), k=5, max_patches_per_combi=25, auc=False)
    got = robustness_index(X[perm], df, k=5, max_patches_per_combi=25, auc=False)
    assert got.summary == want.summary
    as_dict = robustness_index(X[perm], {c: df[c].to_numpy() for c in df.columns}, k=5, max_patches_per_combi=25,
                               auc=False)
    assert as_dict.summary == want.summary
    with pytest.raises(TubError, match="missing column.*medical_center"):
        robustness_index(X, df.drop(columns="medical_center"), k=5)
    nan_class = df.copy()
    nan_class.iloc[3, nan_class.columns.get_loc("biological_class")] = None
    with pytest.raises(TubError, match="biological_class is empty .* in row 3"):
        robustness_index(X[perm], nan_class, k=5)
    bad = X[perm].copy()
    bad[7, 2] = np.nan
    with pytest.raises(TubError, match="feature row 7 .* NaN or inf"):
        robustness_index(bad, df, k=5)
