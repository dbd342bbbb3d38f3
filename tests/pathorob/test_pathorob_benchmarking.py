"""Findings of a QA pass that benchmarked foundation models on own feature tables (tie order, paired-shaped
metadata run unpaired, confounded robustification fits, bootstrap units, several models in one study, and
warnings that name what they are about). Expected numbers are computed here independently of the module."""

import csv
import json

import numpy as np
import pytest

from tub_pathorob.metadata import Metadata
from tub_pathorob.robustness_index import SHUFFLE_SEED, SUMMARY_KEYS, robustness_index
from tub_pathorob.synthetic import paired_subsets, synthetic_features
from tubcli.errors import TubError
from tubcli.testing import invoke


def _ok(args):
    r = invoke(args)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r


def _one_error(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


def _warnings(result, needle: str) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if " WARNING " in ln and needle in ln]


def _write(tmp, name, X, meta):
    np.save(tmp / f"{name}.npy", X)
    meta.write_csv(tmp / f"{name}.csv")
    return tmp / f"{name}.npy", tmp / f"{name}.csv"


def _last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- 1. identical feature rows from different slides: their order decides the neighbours ------------------

def test_identical_rows_from_different_slides_warn_with_their_count(tmp_path):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=3, tiles_per_slide=8,
                                 dim=8, seed=4)
    X = X.copy()
    X[[1, 30, 60]] = X[[9, 41, 70]]  # three tiles copied into another slide (a duplicate tile, blank background)
    X[3] = X[2]                     # a duplicate within one slide: never a neighbour of its own slide's queries
    slide = meta.slide_id
    expected = sum(any(j != i and slide[j] != slide[i] and np.array_equal(X[i], X[j]) for j in range(len(X)))
                   for i in range(len(X)))
    assert expected == 6
    f, m = _write(tmp_path, "dup", X, meta)
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k", "5", "--no-auc", "-o", tmp_path / "ri"])
    lines = _warnings(r, "identical to a row of another slide")
    assert len(lines) == 1 and f" {expected} feature row(s) of the evaluation set" in lines[0]
    assert "row order" in lines[0]
    X[[1, 30, 60]] = X[[1, 30, 60]] + 1e-3  # only the same-slide duplicate left: no warning
    f, m = _write(tmp_path, "samedup", X, meta)
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k", "5", "--no-auc", "-o", tmp_path / "ri2"])
    assert not _warnings(r, "identical to a row")


def test_readme_does_not_promise_scikit_learn_neighbour_lists_under_ties():
    from pathlib import Path

    import tub_pathorob

    readme = (Path(tub_pathorob.__file__).parents[1] / "README.md").read_text()
    assert "ties broken by row order" in readme


# -- 2. paired-shaped subsets evaluated unpaired: a shared tile would count twice --------------------------

def test_tile_shared_by_subsets_is_refused_unpaired_and_fine_paired(tmp_path):
    X, meta = synthetic_features(classes=("a", "b", "c"), centers=("x", "y"), slides_per_cell=2, tiles_per_slide=6,
                                 dim=8, seed=3)
    paired, index = paired_subsets(meta)  # a-b-x-y, a-c-x-y, b-c-x-y: every tile in two subsets
    f, m = _write(tmp_path, "paired", X[index], paired)
    err = _one_error(invoke(["pathorob", "ri", f, "--metadata", m, "--k", "3", "--no-auc", "-o", tmp_path / "u"]))
    assert "occurs more than once in the unpaired evaluation set" in err and "--paired" in err
    assert "drop the duplicate rows" in err
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k", "3", "--paired", "--no-auc", "--json", "-o", tmp_path / "p"])
    assert 0 <= _last_json(r)["robustness_index"] <= 1
    with pytest.raises(TubError, match="--paired"):
        robustness_index(X[index], paired, k=3, paired=False, auc=False)
    # the same rows, each tile once: the unpaired evaluation runs
    first = np.unique(paired.keys(), return_index=True)[1]
    robustness_index(X[index][first], paired.take(first), k=3, auc=False)


# -- 3. train on a confounded fit set; its before/after RI is in-sample ------------------------------------

def _confounded(tmp_path):
    """2 centers x 2 classes; center x has 5 slides of class a and 1 of b, center y the reverse."""
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=5, tiles_per_slide=6,
                                 dim=8, seed=11)
    slides = {}
    for s, b, c in zip(meta.slide_id, meta.biological_class, meta.medical_center):
        slides.setdefault((c, b), [])
        if s not in slides[(c, b)]:
            slides[(c, b)].append(s)
    keep_slides = set(slides[("x", "a")] + slides[("y", "b")] + slides[("x", "b")][:1] + slides[("y", "a")][:1])
    keep = np.array([s in keep_slides for s in meta.slide_id])
    return X[keep], meta.where(keep)


def _cramers_v(centers, classes) -> float:
    from scipy.stats import chi2_contingency

    cs, bs = sorted(set(centers)), sorted(set(classes))
    table = np.array([[np.sum((centers == c) & (classes == b)) for b in bs] for c in cs])
    chi2 = chi2_contingency(table, correction=False)[0]
    return float(np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1))))


@pytest.mark.parametrize("method", ["center-mean", "combat"])
def test_train_warns_when_the_fit_set_is_confounded(tmp_path, method):
    X, meta = _confounded(tmp_path)
    v = _cramers_v(meta.medical_center, meta.biological_class)
    assert v > 0.3
    f, m = _write(tmp_path, "conf", X, meta)
    r = _ok(["pathorob", "train", f, "--metadata", m, "--method", method, "--k", "3", "--json", "-o", tmp_path / "t"])
    lines = _warnings(r, "Cramér's V")
    assert len(lines) == 1 and f"= {v:.3f} over {len(meta)} tiles" in lines[0]
    assert "removes biology along with the center" in lines[0] and "--covariates biological_class" in lines[0]
    # the before/after numbers are labelled in-sample, in the output and the log
    assert "in-sample" in _last_json(r)["before_after"]
    assert any("in-sample" in ln and "`tub pathorob robustify`" in ln for ln in r.stderr.splitlines())


def test_train_on_a_balanced_fit_set_does_not_warn(tmp_path):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=3, tiles_per_slide=6,
                                 dim=8, seed=11)
    assert _cramers_v(meta.medical_center, meta.biological_class) == 0
    f, m = _write(tmp_path, "bal", X, meta)
    r = _ok(["pathorob", "train", f, "--metadata", m, "--method", "center-mean", "--k", "3", "-o", tmp_path / "t"])
    assert not _warnings(r, "Cramér's V")


# -- 4. bootstrap: tile (the reference's) and slide (cluster) units, both with a percentile interval ------

def _hand_query_counts(X, meta, k):
    """Per-query SO and OS among the first k other-slide neighbours, in the reference's row order
    (legacy seed-123 permutation), by plain loops over a full float64 distance matrix."""
    order = np.random.RandomState(SHUFFLE_SEED).permutation(len(X))
    X, slide = X[order], meta.slide_id[order]
    cls, ctr = meta.biological_class[order], meta.medical_center[order]
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    D = ((Xn[:, None, :] - Xn[None, :, :]) ** 2).sum(-1)
    so, os_ = np.zeros(len(X)), np.zeros(len(X))
    for i in range(len(X)):
        nb = [j for j in np.argsort(D[i], kind="stable") if slide[j] != slide[i]][:k]
        so[i] = sum(cls[j] == cls[i] and ctr[j] != ctr[i] for j in nb)
        os_[i] = sum(cls[j] != cls[i] and ctr[j] == ctr[i] for j in nb)
    return so, os_, slide


def _hand_bootstrap(so, os_, units, B, seed):
    """Resample units (tiles or slides) with replacement, as many as there are; RI of each draw."""
    names, of = np.unique(units, return_inverse=True)
    rng = np.random.default_rng(seed)
    ri = []
    for _ in range(B):
        pick = rng.integers(0, len(names), len(names))
        rows = np.concatenate([np.flatnonzero(of == u) for u in pick])
        ri.append(so[rows].sum() / (so[rows].sum() + os_[rows].sum()))
    ri = np.array(ri)
    return ri.mean(), ri.std(ddof=1), np.quantile(ri, [0.025, 0.975])


@pytest.mark.parametrize("unit", ["tile", "slide"])
def test_bootstrap_units_match_a_hand_bootstrap(unit):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y", "z"), slides_per_cell=3, tiles_per_slide=5,
                                 dim=8, bio=0.4, center=0.4, slide=0.8, seed=6)
    so, os_, slide = _hand_query_counts(X, meta, 5)
    units = np.arange(len(so)) if unit == "tile" else slide  # unit u of a draw: query row u, or the u-th slide id
    mean, std, (lo, hi) = _hand_bootstrap(so, os_, units, 300, seed=3)
    s = robustness_index(X, meta, k=5, bootstrap=300, seed=3, auc=False, bootstrap_unit=unit).summary
    assert s["robustness_index"] == pytest.approx(so.sum() / (so.sum() + os_.sum()), abs=1e-12)
    assert s["robustness_index-mean"] == pytest.approx(mean, abs=1e-12)
    assert s["robustness_index-std"] == pytest.approx(std, abs=1e-12)
    assert s["robustness_index-ci95"] == pytest.approx([lo, hi], abs=1e-12)
    assert s["bootstrap_unit"] == unit


def test_slide_bootstrap_from_the_cli(tmp_path):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=3, tiles_per_slide=8,
                                 dim=8, slide=1.0, seed=2)
    f, m = _write(tmp_path, "b", X, meta)
    base = ["pathorob", "ri", f, "--metadata", m, "--k", "5", "--no-auc", "--json"]
    tile = _last_json(_ok([*base, "--bootstrap", "200", "-o", tmp_path / "t"]))
    slide = _last_json(_ok([*base, "--bootstrap", "200", "--bootstrap-unit", "slide", "-o", tmp_path / "s"]))
    assert tile["bootstrap_unit"] == "tile" and slide["bootstrap_unit"] == "slide"
    assert tile["robustness_index"] == slide["robustness_index"]
    lo, hi = slide["robustness_index-ci95"]
    assert lo <= slide["robustness_index-mean"] <= hi
    saved = json.loads((tmp_path / "s" / "outputs" / "results_summary.json").read_text())
    assert saved["robustness_index-ci95"] == [lo, hi]
    assert "--bootstrap-unit slide needs --bootstrap" in _one_error(
        invoke([*base, "--bootstrap-unit", "slide", "-o", tmp_path / "n"]))


# -- 5. several models written into one study --------------------------------------------------------------

def test_models_of_one_study_are_all_kept(tmp_path):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=3, tiles_per_slide=8,
                                 dim=8, seed=1)
    meta.write_csv(tmp_path / "meta.csv")
    rng = np.random.default_rng(0)
    ris = {}
    for i in range(3):  # three "models": different features of the same tiles
        np.save(tmp_path / f"m{i}.npy", X + (i + 1) * rng.standard_normal(X.shape))
        r = _ok(["pathorob", "ri", tmp_path / f"m{i}.npy", "--metadata", tmp_path / "meta.csv", "--k", "5", "--no-auc",
                 "--layout", "official", "--model-name", f"m{i}", "--json", "-o", tmp_path / "study"])
        out = _last_json(r)
        assert out["model_name"] == f"m{i}" and tuple(out)[:len(SUMMARY_KEYS)] == SUMMARY_KEYS
        ris[f"m{i}"] = out["robustness_index"]
        summary = tmp_path / "study" / "outputs" / "robustness_index" / f"m{i}" / "custom" / "-1_5" / "results_summary.json"
        assert set(json.loads(summary.read_text())) == set(SUMMARY_KEYS)  # the official file: official keys only
    assert len(set(ris.values())) == 3
    assert json.loads((tmp_path / "study" / "metrics.json").read_text())["model_name"] == "m2"
    with open(tmp_path / "study" / "outputs" / "study_robustness_index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["dataset"], r["setting"]) for r in rows] == [(f"m{i}", "custom", "-1_5") for i in range(3)]
    assert {r["model"]: float(r["robustness_index"]) for r in rows} == ris


def test_evaluate_study_tables_list_every_model(tmp_path):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=3, tiles_per_slide=6,
                                 dim=8, seed=1)
    meta.write_csv(tmp_path / "meta.csv")
    for i in range(2):
        np.save(tmp_path / f"m{i}.npy", X * (1 + i) + i * np.sin(np.arange(X.size)).reshape(X.shape))
        _ok(["pathorob", "evaluate", tmp_path / f"m{i}.npy", "--metadata", tmp_path / "meta.csv", "--k", "5",
             "--no-auc", "--metrics", "ri,cs", "--K", "2", "--trials", "2", "--layout", "official",
             "--model-name", f"m{i}", "-o", tmp_path / "study"])
        res = json.loads((tmp_path / "study" / "outputs" / "results.json").read_text())
        assert res["model_name"] == f"m{i}"
    out = tmp_path / "study" / "outputs"
    for metric, summary in (("robustness_index", "robustness_index/{m}/custom/-1_5/results_summary.json"),
                            ("clustering_score", "clustering_score/{m}/custom/results_summary.json")):
        with open(out / f"study_{metric}.csv", newline="") as f:
            rows = {r["model"]: r for r in csv.DictReader(f)}
        assert set(rows) == {"m0", "m1"}
        for m, row in rows.items():
            saved = json.loads((out / summary.format(m=m)).read_text())
            key = "robustness_index" if metric == "robustness_index" else "clustering_score_mean"
            assert float(row[key]) == saved[key]


def test_flat_layout_output_keeps_the_official_keys_only(tmp_path):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=3, tiles_per_slide=6,
                                 dim=8, seed=1)
    f, m = _write(tmp_path, "f", X, meta)
    out = _last_json(_ok(["pathorob", "ri", f, "--metadata", m, "--k", "5", "--no-auc", "--json", "-o", tmp_path / "r"]))
    assert tuple(out) == SUMMARY_KEYS
    assert not (tmp_path / "r" / "outputs" / "study_robustness_index.csv").exists()


# -- 6. a class at one center; NaN rows named; a k grid cut by same-slide exclusion ------------------------

def test_class_at_one_center_is_named(tmp_path):
    X, meta = synthetic_features(classes=("a", "b", "c"), centers=("x", "y"), slides_per_cell=2, tiles_per_slide=6,
                                 dim=8, seed=5)
    keep = ~((meta.biological_class == "c") & (meta.medical_center == "y"))
    f, m = _write(tmp_path, "one", X[keep], meta.where(keep))
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k", "3", "--no-auc", "-o", tmp_path / "r"])
    lines = _warnings(r, "one medical center only")
    assert len(lines) == 1 and "c (only at x)" in lines[0] and "a (only" not in lines[0]
    f, m = _write(tmp_path, "all", X, meta)
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k", "3", "--no-auc", "-o", tmp_path / "r2"])
    assert not _warnings(r, "one medical center only")


def test_nan_features_error_names_the_first_bad_row(tmp_path):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=2, tiles_per_slide=6,
                                 dim=8, seed=5)
    X = X.copy()
    X[7, 2], X[12, 0] = np.nan, np.inf
    f, m = _write(tmp_path, "nan", X, meta)
    err = _one_error(invoke(["pathorob", "ri", f, "--metadata", m, "--k", "3", "-o", tmp_path / "r"]))
    assert (f"feature row 7 (slide {meta.slide_id[7]}, patch {meta.patch_id[7]}, center {meta.medical_center[7]})"
            in err and "NaN or inf" in err and "2 row(s)" in err)


def test_k_search_says_which_k_it_dropped(tmp_path):
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=2, tiles_per_slide=3,
                                 dim=8, seed=5)
    big = 40  # one slide of 40 tiles: a query of it keeps only N - 40 neighbours from other slides
    Xb, mb = synthetic_features(classes=("a",), centers=("x",), slides_per_cell=1, tiles_per_slide=big, dim=8, seed=9)
    cols = {c: np.concatenate([meta[c], mb[c] if c != "slide_id" else np.array(["big"] * big, object)])
            for c in meta.columns}
    cols["patch_id"] = np.array([f"p{i}" for i in range(len(cols["patch_id"]))], dtype=object)
    meta2 = Metadata.from_columns("<test>", **cols)
    X2 = np.concatenate([X, Xb])
    n = len(X2)
    assert 31 + big > n  # the grid's largest candidate plus the largest slide exceeds n: all rows are queried,
    m_left = n - big      # and a query of the big slide keeps the rows of the other slides only
    assert m_left == 24
    f, m = _write(tmp_path, "big", X2, meta2)
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k-search", "--max-k", "40", "--no-auc", "-o", tmp_path / "r"])
    lines = _warnings(r, "--k-search")
    assert len(lines) == 1 and "k = 31 dropped" in lines[0] and f"only {m_left} neighbours remain" in lines[0]
    with open(tmp_path / "r" / "outputs" / "balanced-accuracies-bio.csv") as fh:
        assert [int(row["k"]) for row in csv.DictReader(fh)] == [1, 3, 5, 7, 9, 11, 21]
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k-search", "--max-k", "21", "--no-auc", "-o", tmp_path / "r2"])
    assert not _warnings(r, "--k-search")


def test_a_seed_that_changes_nothing_is_said(tmp_path):
    """--seed was recorded in config.yaml although the protocol fixes its own seeds: only --bootstrap draws."""
    X, meta = synthetic_features(classes=("a", "b"), centers=("x", "y"), slides_per_cell=3, tiles_per_slide=8,
                                 dim=8, seed=4)
    f, m = _write(tmp_path, "s", X, meta)
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k", "5", "--no-auc", "--seed", "3", "-o", tmp_path / "a"])
    assert _warnings(r, "--seed 3 changes nothing here")
    r = _ok(["pathorob", "ri", f, "--metadata", m, "--k", "5", "--no-auc", "--seed", "3", "--bootstrap", "20",
             "-o", tmp_path / "b"])
    assert not _warnings(r, "changes nothing")


@pytest.mark.parametrize("dtype, dim", [(np.float32, 16), (np.float64, 7), (np.float16, 5)])
def test_identical_rows_across_slides_counts_as_a_sort_of_the_rows_does(dtype, dim):
    """The count now hashes rows and compares only repeated hashes (a byte sort of the whole matrix held ~6
    copies of it); it must equal the plain count: rows equal to a row of another slide, -0.0 apart from 0.0."""
    from tub_pathorob.robustness_index import identical_rows_across_slides, row_hashes

    rng = np.random.default_rng(3)
    X = rng.standard_normal((3000, dim)).astype(dtype)
    slide = rng.integers(0, 40, len(X)).astype(str)
    X[100:110] = X[5]  # a blank tile on many slides
    X[200] = X[201]
    slide[201] = slide[200]  # repeated within one slide only: not counted
    X[300, 0], X[301] = 0.0, X[300]
    X[301, 0] = -0.0  # equal as numbers, not as bits
    plain = {}
    for r, s in zip(X, slide):
        plain.setdefault(r.tobytes(), set()).add(s)
    want = sum(len(plain[r.tobytes()]) > 1 for r in X)
    assert identical_rows_across_slides(X, slide) == want == 11
    h = row_hashes(X, block=7)
    assert h[100] == h[5] and len(np.unique(h)) == len(plain)
