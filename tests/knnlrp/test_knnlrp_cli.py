"""End-to-end CLI tests of every knnlrp verb on tiny data, and the plugin conformance suite."""

import csv
import json

import numpy as np
import pytest

from tubcli.testing import check_plugin, invoke


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
                  "-o", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)
    assert set(m["aupc_kde_normalised"]) == {"lrp", "random"}
    assert "kappa0" in m["fidelity"]
    with open(out / "outputs" / "flipping.csv") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == 5 and rows[0][-1] == "flip_13"  # 13 flips + the start: end point kept


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


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "{train}", "--target", "nope"], "no column 'nope'"),
        (["train", "{train}", "--k", "4"], "odd k"),
        (["explain", "{test}", "--model", "{missing}"], "no model found"),
        (["explain", "{wrong}", "--model", "{run}"], "feature columns"),
        (["evaluate", "{test}", "--model", "{run}", "--methods", "magic"], "unknown or unavailable method"),
        (["explain", "{test}"], "no model given"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words, knn_run, data_dir, tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    subs = {"{train}": data_dir / "train.csv", "{test}": data_dir / "test.csv", "{missing}": tmp_path / "none",
            "{run}": knn_run, "{wrong}": wrong}
    argv = ["knnlrp"] + [str(subs.get(a, a)) for a in args] + ["-o", str(tmp_path / "run")]
    res = invoke(argv)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert "Traceback" not in res.output


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


def test_lower_precision_is_reported_not_silently_ignored(knn_run, data_dir, tmp_path):
    args = ["knnlrp", "check", str(data_dir / "test.csv"), "--model", str(knn_run), "--json"]
    quiet = invoke([*args, "-o", str(tmp_path / "a")])
    asked = invoke([*args, "--precision", "bf16", "-o", str(tmp_path / "b")])
    assert quiet.exit_code == asked.exit_code == 0
    assert "numpy in float64" not in quiet.stderr
    assert "numpy in float64 on the CPU" in asked.stderr and "--precision bf16" in asked.stderr
    assert json.loads(asked.stdout) == json.loads(quiet.stdout)
