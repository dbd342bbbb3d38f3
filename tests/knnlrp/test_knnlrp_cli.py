"""End-to-end CLI tests of every knnlrp verb on tiny data, and the plugin conformance suite."""

import csv
import json
import sys

import numpy as np
import pytest

from tubcli.testing import check_plugin, expect_error_line, invoke


def test_conformance():
    check_plugin("knnlrp")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("knnlrp-data")
    res = invoke(["knnlrp", "make-data", "wine01", "-o", str(root / "mk"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["train_rows"] + out["test_rows"] == 130
    return root / "mk" / "outputs"


@pytest.fixture(scope="module")
def knn_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("knnlrp-train") / "knn"
    res = invoke(["knnlrp", "train", str(data_dir / "train.csv"), "--target", "target", "--model", "knn",
                  "-o", str(run), "--json"])
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)
    assert m["params"]["k"] % 2 == 1 and m["cv_accuracy"] > 0.8
    assert (run / "checkpoints" / "model.safetensors").is_file() and (run / "DONE").is_file()
    return run


def test_explain_writes_csv_and_npz(knn_run, data_dir, tmp_path):
    out = tmp_path / "ex"
    res = invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(knn_run), "--rule", "midpoint",
                  "-o", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)
    assert m["rows"] == 39 and m["features"] == 13
    with open(out / "outputs" / "relevances.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 39 and "alcohol" in rows[0] and "g" in rows[0]
    assert [int(r["row"]) for r in rows] == list(range(39))  # the input file's data rows, to join back on
    z = np.load(out / "outputs" / "relevances.npz", allow_pickle=False)
    # the midpoint rule conserves g for the kNN
    np.testing.assert_allclose(z["values"].sum(1), z["output"], rtol=1e-9, atol=1e-9)
    assert m["sign_agreement"] >= 0.9


def test_check_reports_exact_conservation(knn_run, data_dir, tmp_path):
    res = invoke(["knnlrp", "check", str(data_dir / "test.csv"), "--model", str(knn_run), "-o", str(tmp_path / "c"),
                  "--json"])
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)
    assert m["kappa0"]["sign_agreement"] == 1.0
    assert m["kappa0"]["conservation_max_rel_error"] <= 1e-9


def test_svm_train_check_and_evaluate(data_dir, tmp_path):
    run = tmp_path / "svm"
    res = invoke(["knnlrp", "train", str(data_dir / "train.csv"), "--model", "svm", "--gamma", "0.05", "--C", "1",
                  "-o", str(run)])
    assert res.exit_code == 0, res.stderr
    res = invoke(["knnlrp", "check", str(data_dir / "test.csv"), "--model", str(run), "-o", str(tmp_path / "c"), "--json"])
    m = json.loads(res.stdout)
    assert m["sign_agreement"] == 1.0 and m["identity_max_abs_residual"] <= 1e-10
    res = invoke(["knnlrp", "evaluate", str(data_dir / "test.csv"), "--model", str(run), "--rows", "6",
                  "--methods", "lrp", "--methods", "occlusion", "--methods", "ig", "-o", str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)
    assert set(m["aupc_mean"]) == {"lrp", "occlusion", "ig"}


def test_evaluate_knn_both_replacements(knn_run, data_dir, tmp_path):
    out = tmp_path / "ev"
    res = invoke(["knnlrp", "evaluate", str(data_dir / "test.csv"), "--model", str(knn_run), "--rows", "8",
                  "--replacement", "both", "--methods", "lrp", "--methods", "random", "--set", "kde_samples=5",
                  "--set", "vector_figures=svg", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)
    assert set(m["aupc_kde_normalised"]) == {"lrp", "random"}
    produced = sorted(p.name for p in (out / "outputs").iterdir())  # the vector copy named as its PNG
    assert "flipping.svg" in produced and not [n for n in produced if n.startswith(".")], produced
    assert "kappa0" in m["fidelity"]
    with open(out / "outputs" / "flipping.csv") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == 5 and rows[0][-1] == "flip_13"  # 13 flips + the start: end point kept
    assert rows[0][:5] == ["replacement", "method", "aupc", "aupc_normalised", "flip_0"]  # no wall-clock column
    assert set(m["explain_seconds_kde"]) == {"lrp", "random"}


def test_explain_digits_draws_heatmaps(tmp_path):
    pytest.importorskip("matplotlib")
    res = invoke(["knnlrp", "make-data", "digits49", "-o", str(tmp_path / "mk")])
    assert res.exit_code == 0, res.stderr
    d = tmp_path / "mk" / "outputs"
    res = invoke(["knnlrp", "train", str(d / "train.csv"), "--k", "5", "-o", str(tmp_path / "t")])
    assert res.exit_code == 0, res.stderr
    res = invoke(["knnlrp", "explain", str(d / "test.csv"), "--model", str(tmp_path / "t"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "e" / "outputs" / "heatmaps.png").stat().st_size > 1000
    # the same -o, rows that are not images: the digits' heatmaps do not stay beside the new relevances
    res = invoke(["knnlrp", "explain", str(d / "test.csv"), "--model", str(tmp_path / "t"), "--set", "heatmaps=false",
                  "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.stderr
    assert not (tmp_path / "e" / "outputs" / "heatmaps.png").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "{train}", "--target", "nope"], "no column 'nope'"),
        (["train", "{train}", "--k", "4"], "odd k"),
        (["explain", "{test}", "--model", "{missing}"], "no model found"),
        (["explain", "{wrong}", "--model", "{run}"], "feature columns"),
        (["evaluate", "{test}", "--model", "{run}", "--methods", "magic"], "unknown or unavailable method"),
        (["explain", "{test}"], "no model given"),
        (["train", "{folder}"], "is a folder"),
        (["train", "{text_npz}"], "no NumPy header"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words, knn_run, data_dir, tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "text.npz").write_text("a,b\n1,2\n")
    subs = {"{train}": data_dir / "train.csv", "{test}": data_dir / "test.csv", "{missing}": tmp_path / "none",
            "{run}": knn_run, "{wrong}": wrong, "{folder}": tmp_path / "folder.csv", "{text_npz}": tmp_path / "text.npz"}
    argv = ["knnlrp"] + [str(subs.get(a, a)) for a in args] + ["-o", str(tmp_path / "run")]
    expect_error_line(invoke(argv), words)


def test_user_files_are_not_modified(knn_run, data_dir, tmp_path):
    before = (data_dir / "test.csv").read_bytes(), (knn_run / "checkpoints" / "model.safetensors").read_bytes()
    invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(knn_run), "-o", str(tmp_path / "x")])
    after = (data_dir / "test.csv").read_bytes(), (knn_run / "checkpoints" / "model.safetensors").read_bytes()
    assert before == after


def test_explain_a_joblib_model_only_with_allow_pickle(data_dir, tmp_path):
    import joblib
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tub_knnlrp.data import read_table

    t = read_table(data_dir / "train.csv", "target")
    path = tmp_path / "user.joblib"
    joblib.dump(make_pipeline(StandardScaler(), KNeighborsClassifier(3)).fit(t.X, t.y), path)
    res = invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(path), "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "executes code" in res.stderr
    res = invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(path), "--allow-pickle",
                  "-o", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["rows"] == 39
    # fitted on a bare array, the model has no names: the table's columns name the relevances
    with open(tmp_path / "b/outputs/relevances.csv", newline="") as f:
        header = next(csv.reader(f))
    assert [h for h in header if h in t.feature_names] == t.feature_names and "x0" not in header


def test_only_the_command_line_lets_a_pickle_run_code(data_dir, tmp_path):
    """A shared config file or an exported variable must not switch allow_pickle on behind the user's
    back; and the "executes code" warning is given also when the file then fails to load."""
    import joblib

    marker = tmp_path / "ran"
    path = tmp_path / "evil.joblib"
    joblib.dump(_Payload(str(marker)), path)
    conf = tmp_path / "shared.yaml"
    conf.write_text("allow_pickle: true\n")
    common = ["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(path)]
    res = invoke([*common, "-c", str(conf), "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "allow_pickle is on in " + str(conf) in res.stderr and "add --allow-pickle" in res.stderr
    res = invoke([*common, "-o", str(tmp_path / "b")], env={"TUB_KNNLRP_ALLOW_PICKLE": "1"})
    assert res.exit_code == 2 and "TUB_KNNLRP_ALLOW_PICKLE" in res.stderr
    assert not marker.exists()
    conf.write_text("allow_pickle: 'false'\n")  # off, as pydantic reads it: the usual refusal of a pickle
    res = invoke([*common, "-c", str(conf), "-o", str(tmp_path / "off")])
    assert res.exit_code == 2 and "is a pickle, and loading it executes code" in res.stderr
    conf.write_text("allow_pickle: true\n")
    res = invoke([*common, "-c", str(conf), "--no-allow-pickle", "-o", str(tmp_path / "no")])  # the flag decides
    assert res.exit_code == 2 and "is a pickle, and loading it executes code" in res.stderr
    assert not marker.exists()
    res = invoke([*common, "-c", str(conf), "--allow-pickle", "-o", str(tmp_path / "c")])  # the user's own word
    assert res.exit_code == 2 and marker.exists() and "holds an object of type TextIOWrapper" in res.stderr
    assert "executes code from the file" in res.stderr


class _Payload:
    """Unpickling this touches a file: the stand-in for a model file that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_model_fitted_on_a_dataframe_without_pandas_here_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    import joblib
    import pandas as pd
    from sklearn.neighbors import KNeighborsClassifier

    from tub_knnlrp.data import read_table

    t = read_table(data_dir / "train.csv", "target")
    path = tmp_path / "frame.joblib"
    joblib.dump(KNeighborsClassifier(3).fit(pd.DataFrame(t.X, columns=t.feature_names), t.y), path)
    monkeypatch.setitem(sys.modules, "pandas", None)  # unpickling the model does not need pandas; passing rows does
    res = invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(path), "--allow-pickle",
                  "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "fitted on a pandas DataFrame" in res.stderr and "pip install pandas" in res.stderr


def test_explain_a_joblib_pipeline_with_a_mixing_step_names_its_components(data_dir, tmp_path):
    import joblib
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tub_knnlrp.data import read_table

    t = read_table(data_dir / "train.csv", "target")
    path = tmp_path / "pca.joblib"
    joblib.dump(make_pipeline(StandardScaler(), PCA(3), KNeighborsClassifier(3)).fit(t.X, t.y), path)
    res = invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(path), "--allow-pickle",
                  "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.stderr
    header = (tmp_path / "e" / "outputs" / "relevances.csv").read_text().splitlines()[0]
    assert header.startswith("pca0,pca1,pca2,g,")


def test_lower_precision_is_reported_not_silently_ignored(knn_run, data_dir, tmp_path):
    args = ["knnlrp", "check", str(data_dir / "test.csv"), "--model", str(knn_run), "--json"]
    quiet = invoke([*args, "-o", str(tmp_path / "a")])
    asked = invoke([*args, "--precision", "bf16", "-o", str(tmp_path / "b")])
    assert quiet.exit_code == asked.exit_code == 0
    assert "numpy in float64" not in quiet.stderr
    assert "numpy in float64 on the CPU" in asked.stderr and "--precision bf16" in asked.stderr
    assert json.loads(asked.stdout) == json.loads(quiet.stdout)


@pytest.fixture
def tiny_csv(tmp_path):
    X = np.random.default_rng(0).normal(size=(40, 3))
    path = tmp_path / "tiny.csv"
    path.write_text("a,b,c,target\n" + "".join(f"{a},{b},{c},{int(a > 0)}\n" for a, b, c in X))
    return path


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "{gap}", "--k", "3"], "missing label in column 'target' (row 2); drop or fill it"),
        (["train", "{tiny}", "--model", "svm", "--k", "4"], "--k: not used by --model svm"),
        (["train", "{tiny}", "--k", "3", "--gamma", "1", "--C", "2"], "--gamma, --C: not used by --model knn"),
        (["make-data", "iris", "--set", "test_size=0.01"], "choose test_size in [0.02, 0.98]"),
        (["make-data", "iris", "--seed", str(10**23)], "'seed'"),
    ],
)
def test_bad_values_are_one_line_exit_2(args, words, tiny_csv, tmp_path):
    gap = tmp_path / "gap.csv"
    gap.write_text("a,target\n1,0\n2,\n3,1\n")
    subs = {"{tiny}": tiny_csv, "{gap}": gap}
    res = invoke(["knnlrp"] + [str(subs.get(a, a)) for a in args] + ["-o", str(tmp_path / "run")])
    expect_error_line(res, words)


def test_unknown_eta_sweep_method_is_named(knn_run, data_dir, tmp_path):
    res = invoke(["knnlrp", "evaluate", str(data_dir / "test.csv"), "--model", str(knn_run), "--rows", "2",
                  "--methods", "lrp_etaabc", "-o", str(tmp_path / "e")])
    expect_error_line(res, "unknown or unavailable method(s) lrp_etaabc")


def test_heatmaps_on_non_pixel_data_fail_before_writing(knn_run, data_dir, tmp_path):
    out = tmp_path / "ex"
    res = invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(knn_run), "--heatmaps",
                  "-o", str(out)])
    expect_error_line(res, "heatmaps need a square number of pixel features")
    assert not (out / "outputs" / "relevances.csv").exists() and not (out / "outputs" / "relevances.npz").exists()


def test_an_edited_model_is_a_one_line_error(knn_run, data_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(knn_run / "checkpoints", model)
    meta = json.loads((model / "model.json").read_text())
    meta["scaler"] = "minmax"
    (model / "model.json").write_text(json.dumps(meta))
    res = invoke(["knnlrp", "check", str(data_dir / "test.csv"), "--model", str(model), "-o", str(tmp_path / "c")])
    expect_error_line(res, "is not a valid tub-knnlrp model")


def _train_k3_and_check(folder, X, y, n_train: int) -> dict:
    """`train --k 3` on the first n_train rows (CSV with a header), then `check` on the rest: its report."""
    header = ",".join("abcdefgh"[:X.shape[1]]) + ",target\n"
    for name, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        (folder / f"{name}.csv").write_text(header + "".join(",".join(map(str, [*x, t])) + "\n"
                                                             for x, t in zip(X[rows], y[rows])))
    res = invoke(["knnlrp", "train", str(folder / "train.csv"), "--k", "3", "--scaler", "none", "-o", str(folder / "t")])
    assert res.exit_code == 0, res.stderr
    res = invoke(["knnlrp", "check", str(folder / "test.csv"), "--model", str(folder / "t"), "-o", str(folder / "c"),
                  "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_check_reports_multiclass_vote_ties(tmp_path):
    from sklearn.datasets import make_blobs

    X, y = make_blobs(300, centers=4, cluster_std=4, random_state=0)
    m = _train_k3_and_check(tmp_path, X, y, 200)
    assert m["vote_ties"] > 0 and m["no_majority"] == m["vote_ties"]  # k = 3: no plurality without a tie
    assert m["kappa0"]["sign_agreement"] < 1.0  # sklearn breaks a tie by class order, the networks cannot
    assert m["kappa0"]["sign_agreement_without_ties"] == m["kappa0"]["sign_agreement_majority"] == 1.0


def test_check_reports_distance_ties_of_a_binary_knn(tmp_path):
    """Integer features: many rows with g = 0 exactly (equidistant deciding neighbours), which scikit-learn
    breaks by row order; without them the sign agreement at κ = 0 is exact."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 3, (140, 4))
    y = (X.sum(1) + rng.integers(0, 2, 140) > 4).astype(int)
    m = _train_k3_and_check(tmp_path, X, y, 80)["kappa0"]
    assert m["distance_ties"] > 0 and m["sign_agreement"] < 1.0
    assert m["sign_agreement_without_distance_ties"] == 1.0


def test_check_reports_pairwise_vote_ties_of_a_multiclass_svm():
    from sklearn.svm import SVC

    from tub_knnlrp.fidelity import check_report

    rng = np.random.default_rng(0)
    svc = SVC(gamma=1.0).fit(rng.normal(size=(60, 2)), rng.integers(0, 3, 60))
    m = check_report(svc, rng.normal(size=(200, 2)) * 2)
    assert m["vote_ties"] == 1 and m["sign_agreement"] == 0.995  # libsvm gives the tie to the first class
    assert m["sign_agreement_without_ties"] == 1.0


def test_explain_leaves_out_columns_the_model_was_not_trained_on(knn_run, data_dir, tmp_path):
    """A file that still holds its label under another name than --target (and an id column), columns in
    another order: the model's features are taken by name; was "has 15 feature columns, the model expects 13"."""
    with open(data_dir / "test.csv") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    order = [header.index("target")] + list(range(len(header) - 2, -1, -1))  # label first, features reversed
    with open(tmp_path / "mixed.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        for i, r in enumerate(rows):
            w.writerow(["id" if i == 0 else str(i)] + [("species" if i == 0 and j == order[0] else r[j]) for j in order])
    res = invoke(["knnlrp", "explain", str(tmp_path / "mixed.csv"), "--model", str(knn_run), "--rule", "midpoint",
                  "-o", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert "column(s) id, species are not features of the model; left out" in res.stderr
    res = invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(knn_run), "--rule", "midpoint",
                  "-o", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.stderr
    a, b = (np.load(tmp_path / d / "outputs" / "relevances.npz") for d in "ab")
    np.testing.assert_array_equal(a["values"], b["values"])
    assert list(a["feature_names"]) == list(b["feature_names"])


def test_beta_mc_is_an_option():
    res = invoke(["knnlrp", "explain", "--multiclass", "softmin", "--beta-mc", "0.5", "--print-config"])
    assert res.exit_code == 0, res.stderr
    assert "beta_mc: 0.5" in res.stdout


def test_a_pickled_dataframe_pipeline_runs_without_feature_name_warnings(data_dir, tmp_path):
    pd = pytest.importorskip("pandas")
    import warnings

    import joblib
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from tub_knnlrp.data import read_table

    t = read_table(data_dir / "train.csv", "target")
    path = tmp_path / "user.joblib"
    joblib.dump(make_pipeline(StandardScaler(), SVC(gamma=0.05)).fit(pd.DataFrame(t.X, columns=t.feature_names), t.y),
                path)
    for verb in ("explain", "check"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = invoke(["knnlrp", verb, str(data_dir / "test.csv"), "--model", str(path), "--allow-pickle", "-q",
                          "-o", str(tmp_path / verb)])
        assert res.exit_code == 0, res.stderr
        noisy = [str(w.message) for w in caught if "feature names" in str(w.message)]
        assert not noisy and "feature names" not in res.stderr, noisy[:1] or res.stderr


def test_a_shap_that_fails_to_import_is_skipped_with_a_reason(knn_run, data_dir, tmp_path, monkeypatch):
    import importlib.machinery
    import sys

    from tub_knnlrp.flipping import shap_problem

    class BrokenShap(importlib.machinery.PathFinder):  # a shap that is installed but raises on import
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == "shap":
                return importlib.machinery.ModuleSpec("shap", BrokenLoader())
            return None

    class BrokenLoader:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError("numba needs numpy < 3")

    monkeypatch.delitem(sys.modules, "shap", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenShap, *sys.meta_path])
    assert "does not import (ImportError: numba needs numpy < 3)" in shap_problem()
    base = ["knnlrp", "evaluate", str(data_dir / "test.csv"), "--model", str(knn_run), "--rows", "4"]
    res = invoke([*base, "-o", str(tmp_path / "ev"), "--json"])  # the default method list runs without it
    assert res.exit_code == 0, res.stderr
    assert "kernelshap" not in json.loads(res.stdout)["aupc_mean"] and "KernelSHAP skipped" in res.stderr
    res = invoke([*base, "--methods", "kernelshap", "-o", str(tmp_path / "ev2")])
    assert res.exit_code == 2 and "method kernelshap: shap is installed but does not import" in res.stderr


def test_methods_take_a_comma_list(knn_run, data_dir, tmp_path):
    res = invoke(["knnlrp", "evaluate", str(data_dir / "test.csv"), "--model", str(knn_run), "--rows", "4",
                  "--methods", "lrp,random", "--methods", "occlusion", "-o", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert set(json.loads(res.stdout)["aupc_mean"]) == {"lrp", "random", "occlusion"}


def test_demo_meets_the_conservation_and_flipping_bars_and_says_it_ignores_the_device(tmp_path):
    """`tub demo knnlrp` (breast cancer, kNN): exact conservation, kNN-LRP far below occlusion (spec §6.3),
    and --device cuda / --precision named as unused, as every knnlrp verb does."""
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    from tub_knnlrp.demo import run_demo

    res = run_demo(Run("knnlrp", "demo", TubConfig(precision="bf16"), out=tmp_path / "demo"))
    assert res["conservation_max_rel_error"] < 1e-9 and res["sign_agreement_kappa0"] == 1
    assert res["aupc_knn_lrp"] <= 0.5 * res["aupc_occlusion"]
    assert "--precision bf16 do not change that" in (tmp_path / "demo" / "tub.log").read_text()


def test_a_run_directory_is_read_even_beside_a_json_file_of_its_name(knn_run, data_dir, tmp_path):
    """`train -o run1 --json > run1.json` left run1.json beside run1/: --model run1 read that file."""
    import shutil

    run = tmp_path / "run1"
    shutil.copytree(knn_run, run)
    (tmp_path / "run1.json").write_text('{"results": "of the train command"}')
    r = invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(run), "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.stderr


def _colour_table(tmp_path, pd, n=80):
    """A table with a text column (colour) that decides the class together with x."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x": rng.normal(size=n), "w": rng.normal(size=n), "colour": rng.choice(["red", "green"], n)})
    df["target"] = np.where((df.x > 0) ^ (df.colour == "red"), "yes", "no")
    df.to_csv(tmp_path / "colour.csv", index=False)
    return df


def test_a_pipeline_that_encodes_a_text_column_is_explained_and_evaluated(tmp_path):
    """One-hot encoding in a user's pipeline: the text column goes to the model raw (the relevances are
    the encoded columns'); a user's kNN is evaluated on the training set it keeps, an SVC on --train-data."""
    pd = pytest.importorskip("pandas")
    import joblib
    from sklearn.compose import make_column_transformer
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    from sklearn.svm import SVC

    from tub_knnlrp import explain

    df = _colour_table(tmp_path, pd)
    X, y = df.drop(columns="target"), df.target
    encode = make_column_transformer((StandardScaler(), ["x", "w"]), (OneHotEncoder(), ["colour"]))
    for name, est, exact in (("knn", KNeighborsClassifier(5), ["--kappa", "0"]), ("svm", SVC(gamma=0.5), [])):
        model = make_pipeline(encode, est).fit(X, y)
        with pytest.warns(UserWarning, match="mix features"):
            e = explain(model, X[:5], rule="midpoint")  # the raw rows, text included
        assert e.feature_names[-2:] == ["onehotencoder__colour_green", "onehotencoder__colour_red"]
        assert list(e.prediction) == list(model.predict(X[:5]))
        joblib.dump(model, tmp_path / f"{name}.joblib")
        res = invoke(["knnlrp", "explain", str(tmp_path / "colour.csv"), "--model", str(tmp_path / f"{name}.joblib"),
                      "--allow-pickle", "-o", str(tmp_path / f"ex_{name}"), "--json", *exact])
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["sign_agreement"] == 1.0 and "mix features" in res.stderr
        assert "UserWarning" not in res.stderr  # logged as one line, not Python's warning with its source line
    ev = ["knnlrp", "evaluate", str(tmp_path / "colour.csv"), "--allow-pickle", "--methods", "lrp,occlusion",
          "--rows", "20", "--json"]
    res = invoke(ev + ["--model", str(tmp_path / "knn.joblib"), "-o", str(tmp_path / "ev_knn")])
    assert res.exit_code == 0, res.stderr
    assert set(json.loads(res.stdout)["aupc_mean"]) == {"lrp", "occlusion"}
    expect_error_line(invoke(ev + ["--model", str(tmp_path / "svm.joblib"), "-o", str(tmp_path / "ev_svm0")]),
                      "--train-data")
    res = invoke(ev + ["--model", str(tmp_path / "svm.joblib"), "--train-data", str(tmp_path / "colour.csv"),
                       "-o", str(tmp_path / "ev_svm")])
    assert res.exit_code == 0, res.stderr
    # the SVM's default η from the training set, as the spec's heuristic says: no warning about it
    res = invoke(["knnlrp", "explain", str(tmp_path / "colour.csv"), "--model", str(tmp_path / "svm.joblib"),
                  "--allow-pickle", "--train-data", str(tmp_path / "colour.csv"), "-o", str(tmp_path / "ex_svm2")])
    assert res.exit_code == 0 and "support vectors' median" not in res.stderr, res.stderr


def test_a_text_column_without_an_encoding_step_and_train_data_misuse_are_one_line_errors(knn_run, data_dir, tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(data_dir / "test.csv")
    df["alcohol"] = "high"
    df.to_csv(tmp_path / "text.csv", index=False)
    expect_error_line(invoke(["knnlrp", "explain", str(tmp_path / "text.csv"), "--model", str(knn_run),
                              "-o", str(tmp_path / "a")]), "column 'alcohol' is not numeric")
    expect_error_line(invoke(["knnlrp", "explain", str(data_dir / "test.csv"), "--model", str(knn_run),
                              "--train-data", str(data_dir / "train.csv"), "-o", str(tmp_path / "b")]),
                      "carries its training set")


def test_features_named_like_the_output_columns_keep_the_csv_readable(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"g": rng.normal(size=40), "pred": rng.normal(size=40)})
    df["target"] = (df.g > 0).astype(int)
    df.to_csv(tmp_path / "d.csv", index=False)
    assert invoke(["knnlrp", "train", str(tmp_path / "d.csv"), "--k", "3", "-o", str(tmp_path / "m")]).exit_code == 0
    res = invoke(["knnlrp", "explain", str(tmp_path / "d.csv"), "--model", str(tmp_path / "m"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 0 and "knnlrp_g" in res.stderr
    back = pd.read_csv(tmp_path / "e" / "outputs" / "relevances.csv")
    assert list(back.columns) == ["g", "pred", "knnlrp_g", "knnlrp_pred", "knnlrp_positive", "knnlrp_negative",
                                  "knnlrp_row"]
    assert back["knnlrp_pred"].isin([0, 1]).all()


def test_load_model_from_the_package_explains_as_the_cli_does(tmp_path):
    """The README's Python route to a trained model: tub_knnlrp.load_model(run) and explain(m.pipeline, X, ...)."""
    import tub_knnlrp

    assert "load_model" in dir(tub_knnlrp)
    d = tmp_path / "mk" / "outputs"
    assert invoke(["knnlrp", "make-data", "wine01", "-o", str(tmp_path / "mk")]).exit_code == 0
    assert invoke(["knnlrp", "train", str(d / "train.csv"), "--k", "5", "-o", str(tmp_path / "t")]).exit_code == 0
    res = invoke(["knnlrp", "explain", str(d / "test.csv"), "--model", str(tmp_path / "t"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.stderr
    m = tub_knnlrp.load_model(tmp_path / "t")
    with open(d / "test.csv") as fh:
        rows = list(csv.DictReader(fh))
    X = np.array([[float(r[c]) for c in m.feature_names] for r in rows])
    e = tub_knnlrp.explain(m.pipeline, X, X_train=m.X_train, y_train=m.y_train)
    with open(tmp_path / "e" / "outputs" / "relevances.csv") as fh:
        cli = np.array([[float(r[c]) for c in m.feature_names] for r in csv.DictReader(fh)])
    np.testing.assert_allclose(e.values, cli, rtol=1e-12, atol=1e-15)
