"""Cross-validation as one result: per-slide predictions of train (test slides) and evaluate, and
`cv-summary` over the folds of `train --fold k/K`: per-fold metrics as each fold reported them, mean ± sd,
pooled out-of-fold metrics recomputed independently, and folds that do not belong together refused."""

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tubcli.testing import expect_error_line, invoke

from tub_xmil.bags import write_features_h5

N = 9


def _ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Nine slides, two classes (the planted signal in feature 0), and the three folds' run folders."""
    d = tmp_path_factory.mktemp("cv")
    (d / "bags").mkdir()
    for i in range(N):
        rng = np.random.default_rng(i)
        x = rng.standard_normal((5, 8)).astype(np.float32)
        x[:, 0] += 2.0 * (i % 2)
        coords = np.stack([np.arange(5) * 64, np.zeros(5)], 1).astype(np.int64)
        write_features_h5(d / "bags" / f"s{i}.h5", x, coords, {"patch_size_level0": 64})
    labels = d / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i},{['neg', 'pos'][i % 2]}\n" for i in range(N)))
    runs = [d / f"fold{k}" for k in range(3)]
    for k, run in enumerate(runs):
        _ok(invoke(["xmil", "train", "--features", d / "bags", "--labels", labels, "--epochs", "3", "--set", "lr=0.01",
                    "--set", "model.features_dim=8", "--fold", f"{k}/3", "-o", run, "-q"]))
    return d, labels, runs


def test_cv_summary_pools_the_folds_as_each_reported_them(cohort, tmp_path):
    d, labels, runs = cohort
    res = json.loads(_ok(invoke(["xmil", "cv-summary", *runs, "--bootstrap", "200", "-o", tmp_path / "s",
                                 "--json"])).stdout)
    assert (res["folds"], res["of_folds"], res["slides"]) == (3, 3, N)
    folds = _rows(tmp_path / "s" / "outputs" / "folds.csv")
    per_fold = []
    for run, row in zip(runs, folds):
        reported = json.loads((run / "metrics.json").read_text())
        assert row["fold"] == reported["fold"] and int(row["test_slides"]) == reported["test_slides"]
        for name in ("auroc", "balanced_accuracy"):  # recomputed from the predictions file = what train said
            assert float(row[name]) == pytest.approx(reported[f"test_{name}"], abs=1e-9)
        per_fold.append([reported["test_auroc"], reported["test_balanced_accuracy"]])
    per_fold = np.array(per_fold)
    assert res["mean_auroc"] == pytest.approx(per_fold[:, 0].mean())
    assert res["sd_balanced_accuracy"] == pytest.approx(per_fold[:, 1].std(ddof=1))
    oof = _rows(tmp_path / "s" / "outputs" / "oof_predictions.csv")
    assert sorted(r["slide_id"] for r in oof) == sorted(f"s{i}" for i in range(N))  # each slide once
    assert {r["split"] for r in oof} == {"test"}
    y = [r["label"] == "pos" for r in oof]
    p = [float(r["p_pos"]) for r in oof]
    assert res["pooled_auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)  # independent of tub's metrics
    assert all(abs(float(r["p_pos"]) + float(r["p_neg"]) - 1) < 1e-6 for r in oof)
    lo, hi = res["pooled_ci"]["auroc"]
    assert lo <= res["pooled_auroc"] <= hi
    assert (tmp_path / "s" / "outputs" / "roc.png").stat().st_size > 0


def test_evaluate_writes_the_same_predictions_as_the_fold_that_held_the_slides_out(cohort, tmp_path):
    d, labels, runs = cohort
    _ok(invoke(["xmil", "evaluate", "--model", runs[1] / "checkpoints", "--features", d / "bags", "--labels",
                runs[1] / "outputs" / "fold_labels.csv", "--set", "flipping=false", "--bootstrap", "0", "-o", tmp_path / "e"]))
    ev = {r["slide_id"]: r for r in _rows(tmp_path / "e" / "outputs" / "predictions.csv")}
    tr = {r["slide_id"]: r for r in _rows(runs[1] / "outputs" / "test_predictions.csv")}
    assert ev.keys() == tr.keys() and len(ev) == 3
    assert (tmp_path / "e" / "outputs" / "roc.png").stat().st_size > 0
    for sid, r in tr.items():
        assert ev[sid]["label"] == r["label"] and ev[sid]["predicted"] == r["predicted"]
        assert float(ev[sid]["p_pos"]) == pytest.approx(float(r["p_pos"]), abs=1e-6)


def test_cv_summary_refuses_runs_that_are_not_folds_of_one_partition(cohort, tmp_path):
    d, labels, runs = cohort
    out = tmp_path / "s"
    expect_error_line(invoke(["xmil", "cv-summary", runs[0], runs[0], "-o", out]), "fold 0/3 is given twice")
    expect_error_line(invoke(["xmil", "cv-summary", labels, "-o", out]), "not a run folder", "--fold k/K")
    other_seed = tmp_path / "seed1"
    _ok(invoke(["xmil", "train", "--features", d / "bags", "--labels", labels, "--epochs", "1", "--set",
                "model.features_dim=8", "--fold", "2/3", "--seed", "1", "-o", other_seed, "-q"]))
    expect_error_line(invoke(["xmil", "cv-summary", runs[0], other_seed, "-o", out]), "--seed", "not folds of one")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs[2], unfinished)
    (unfinished / "DONE").unlink()
    expect_error_line(invoke(["xmil", "cv-summary", runs[0], unfinished, "-o", out]), "has not finished")
    older = tmp_path / "older"  # a fold of an earlier tub-xmil: no predictions to pool
    shutil.copytree(runs[2], older)
    (older / "outputs" / "test_predictions.csv").unlink()
    expect_error_line(invoke(["xmil", "cv-summary", runs[0], older, "-o", out]), "no outputs/test_predictions.csv",
                      "train that fold again")
    res = _ok(invoke(["xmil", "cv-summary", runs[0], runs[2], "--bootstrap", "0", "-o", tmp_path / "two", "--json"]))
    assert "folds 1 of 3 are missing" in res.stderr
    assert json.loads(res.stdout)["slides"] < N


@pytest.mark.parametrize("task", ["regression", "survival"])
def test_predictions_file_round_trips_the_task_metrics(tmp_path, task):
    from types import SimpleNamespace

    from tub_xmil.predictions import read_predictions, write_predictions
    from tub_xmil.training import task_metrics

    rng = np.random.default_rng(0)
    slides = [SimpleNamespace(slide_id=f"s{i}", split="test", label=float(rng.normal()), time=float(rng.uniform(1, 9)),
                              event=int(i % 3 != 0)) for i in range(12)]
    preds = rng.normal(size=(12, 1))
    write_predictions(tmp_path / "p.csv", slides, preds, task, None)
    back, p = read_predictions(tmp_path / "p.csv", task, None)
    assert task_metrics(back, p, task) == task_metrics(slides, preds, task)  # full float precision kept


def test_kaplan_meier_and_logrank_equal_scipys():
    """Own product-limit estimator and log-rank test against scipy.stats.ecdf / logrank (censoring, tied times)."""
    from scipy.stats import CensoredData, ecdf, logrank as scipy_logrank

    from tub_xmil.metrics import kaplan_meier, logrank

    rng = np.random.default_rng(1)
    t = np.round(rng.exponential(5, 60), 0) + 1  # rounded: many ties between events and censorings
    e = rng.random(60) < 0.7
    g = rng.random(60) < 0.5
    t[g] *= 0.6
    at, s = kaplan_meier(t, e)
    assert np.allclose(s, ecdf(CensoredData.right_censored(t, ~e)).sf.evaluate(at), atol=1e-12)
    chi, p = logrank(t, e, g)
    ref = scipy_logrank(CensoredData.right_censored(t[g], ~e[g]), CensoredData.right_censored(t[~g], ~e[~g]))
    assert chi == pytest.approx(float(ref.statistic) ** 2, rel=1e-9) and p == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert p < 0.05  # the groups differ (times scaled by 0.6)
    same = np.concatenate([t, t]), np.concatenate([e, e]), np.r_[np.ones(60, bool), np.zeros(60, bool)]
    assert logrank(*same)[0] == pytest.approx(0, abs=1e-12)  # two identical groups: no difference at all


def test_survival_folds_split_risk_at_each_folds_median(tmp_path):
    from scipy.stats import CensoredData, logrank as scipy_logrank

    rng = np.random.default_rng(0)
    (tmp_path / "bags").mkdir()
    rows = ["slide_id,time,event"]
    for i in range(18):
        r = rng.normal()
        x = rng.standard_normal((4, 8)).astype(np.float32)
        x[:, 0] += r
        write_features_h5(tmp_path / "bags" / f"s{i}.h5", x, np.stack([np.arange(4) * 64, np.zeros(4)], 1).astype(np.int64),
                          {"patch_size_level0": 64})
        rows.append(f"s{i},{rng.exponential(10 * np.exp(-r)):.3f},{int(rng.random() < 0.8)}")
    labels = tmp_path / "surv.csv"
    labels.write_text("\n".join(rows) + "\n")
    runs = [tmp_path / f"f{k}" for k in range(2)]
    for k, run in enumerate(runs):
        _ok(invoke(["xmil", "train", "--features", tmp_path / "bags", "--labels", labels, "--task", "survival",
                    "--epochs", "2", "--set", "model.features_dim=8", "--fold", f"{k}/2", "-o", run, "-q"]))
    res = json.loads(_ok(invoke(["xmil", "cv-summary", *runs, "--bootstrap", "0", "-o", tmp_path / "s",
                                 "--json"])).stdout)
    oof = _rows(tmp_path / "s" / "outputs" / "oof_predictions.csv")
    t = np.array([float(r["time"]) for r in oof])
    e = np.array([r["event"] == "1" for r in oof])
    risk = np.array([float(r["risk"]) for r in oof])
    fold = np.array([r["fold"] for r in oof])
    high = np.zeros(len(oof), bool)
    for k in set(fold):
        high[fold == k] = risk[fold == k] > np.median(risk[fold == k])
    assert res["pooled_high_risk_slides"] == high.sum() and res["pooled_low_risk_slides"] == (~high).sum()
    ref = scipy_logrank(CensoredData.right_censored(t[high], ~e[high]), CensoredData.right_censored(t[~high], ~e[~high]))
    assert res["pooled_logrank_p"] == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert (tmp_path / "s" / "outputs" / "km_risk_groups.png").stat().st_size > 0
    ev = json.loads(_ok(invoke(["xmil", "evaluate", "--model", runs[0] / "checkpoints", "--features", tmp_path / "bags",
                                "--labels", runs[0] / "outputs" / "fold_labels.csv", "--set", "flipping=false",
                                "--bootstrap", "0", "-o", tmp_path / "e", "--json"])).stdout)
    assert ev["high_risk_slides"] + ev["low_risk_slides"] == ev["slides"] == 9
    assert (tmp_path / "e" / "outputs" / "km_risk_groups.png").stat().st_size > 0
    # reruns into the same -o: what an earlier run of another task or with flipping left there does not stay
    (tmp_path / "s" / "outputs" / "roc.png").write_bytes(b"a classification summary's figure")
    _ok(invoke(["xmil", "cv-summary", *runs, "--bootstrap", "0", "-o", tmp_path / "s"]))
    assert not (tmp_path / "s" / "outputs" / "roc.png").exists()
    (tmp_path / "e" / "outputs" / "flipping.json").write_text("[]")
    (tmp_path / "e" / "outputs" / "flipping.png").write_bytes(b"an earlier evaluation's curves")
    _ok(invoke(["xmil", "evaluate", "--model", runs[0] / "checkpoints", "--features", tmp_path / "bags", "--labels",
                runs[0] / "outputs" / "fold_labels.csv", "--set", "flipping=false", "--bootstrap", "0",
                "-o", tmp_path / "e"]))
    assert not (tmp_path / "e" / "outputs" / "flipping.json").exists()
    assert not (tmp_path / "e" / "outputs" / "flipping.png").exists()


def test_a_patient_column_in_any_case_keeps_patients_together(tmp_path):
    """A 'Patient_ID' header was read as no patient column: 6 patients' slides landed in train and test."""
    from tub_xmil.dataset import load_slides
    from tub_xmil.splits import cross_validation_fold

    (tmp_path / "bags").mkdir()
    for i in range(12):
        write_features_h5(tmp_path / "bags" / f"s{i}.h5", np.ones((2, 4), np.float32), np.zeros((2, 2), np.int64), {})
    labels = tmp_path / "labels.csv"
    labels.write_text("Slide_ID,Label,Patient_ID\n" + "".join(f"s{i},{i % 2},p{i // 2}\n" for i in range(12)))
    slides, _ = load_slides(tmp_path / "bags", labels, "classification")
    assert [s.extra["case_id"] for s in slides] == [f"p{i // 2}" for i in range(12)]
    for k in range(3):
        train, test = cross_validation_fold(slides, k, 3, "classification", seed=0)
        assert not {s.extra["case_id"] for s in train} & {s.extra["case_id"] for s in test}


def test_intervals_resample_patients_and_one_class_draws_give_no_balanced_accuracy(tmp_path):
    """A one-class draw's balanced accuracy is that class's recall (1.0 for a model that says one class
    everywhere): it inflated fold means and intervals. A patient's slides are resampled together."""
    from types import SimpleNamespace

    from tub_xmil.predictions import read_predictions, write_predictions
    from tub_xmil.training import bootstrap_slides, task_metrics

    slides = [SimpleNamespace(slide_id=f"s{i}", split="test", label=float(i % 2), extra={"case_id": f"p{i // 4}"})
              for i in range(16)]
    constant = np.tile([0.9, 0.1], (16, 1))  # says class 0 for every slide: balanced accuracy 0.5
    assert task_metrics(slides, constant, "classification")["balanced_accuracy"] == 0.5
    assert np.isnan(task_metrics(slides[::2], constant[::2], "classification")["balanced_accuracy"])
    write_predictions(tmp_path / "p.csv", slides, constant, "classification", ["neg", "pos"])
    back, p = read_predictions(tmp_path / "p.csv", "classification", ["neg", "pos"])
    assert [s.extra["case_id"] for s in back] == [s.extra["case_id"] for s in slides]
    ci = bootstrap_slides(back, p, "classification", 300, seed=0)
    assert (ci["unit"], ci["units"]) == ("patient", 4) and ci["balanced_accuracy"] == [0.5, 0.5]


def test_cv_summary_of_a_cohort_with_patients_resamples_them(cohort, tmp_path):
    """With a patient column the folds' predictions carry case_id, and cv-summary stopped on it ('dict
    contains fields not in fieldnames'): patient intervals were out of reach from the command line."""
    d, _, _ = cohort
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,Patient_ID\n" + "".join(f"s{i},{['neg', 'pos'][i % 2]},p{i // 3}\n"
                                                              for i in range(N)))
    runs = [tmp_path / f"fold{k}" for k in range(3)]
    for k, run in enumerate(runs):
        _ok(invoke(["xmil", "train", "--features", d / "bags", "--labels", labels, "--epochs", "2", "--set",
                    "model.features_dim=8", "--fold", f"{k}/3", "-o", run, "-q"]))
    res = json.loads(_ok(invoke(["xmil", "cv-summary", *runs, "--bootstrap", "200", "-o", tmp_path / "s",
                                 "--json"])).stdout)
    assert (res["pooled_ci"]["unit"], res["pooled_ci"]["units"]) == ("patient", 3)
    oof = _rows(tmp_path / "s" / "outputs" / "oof_predictions.csv")
    assert sorted({r["case_id"] for r in oof}) == ["p0", "p1", "p2"]
    for r in oof:  # each patient's slides held out together
        assert len({o["fold"] for o in oof if o["case_id"] == r["case_id"]}) == 1


def test_labels_that_differ_only_in_case_are_named(tmp_path, caplog):
    from tub_xmil.dataset import load_slides

    (tmp_path / "bags").mkdir()
    for i in range(4):
        write_features_h5(tmp_path / "bags" / f"s{i}.h5", np.ones((2, 4), np.float32), np.zeros((2, 2), np.int64), {})
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns0,pos\ns1,Pos\ns2,neg\ns3,neg\n")
    with caplog.at_level("WARNING", logger="tub"):
        _, classes = load_slides(tmp_path / "bags", labels, "classification")
    assert classes == ["Pos", "neg", "pos"] and "the labels 'Pos' and 'pos' differ only in case" in caplog.text
    labels.write_text("slide_id,label,patient_id,split\ns0,pos,p0,train\ns1,neg,p0,test\ns2,neg,p1,train\n"
                      "s3,pos,p2,test\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="tub"):
        load_slides(tmp_path / "bags", labels, "classification")
    assert "1 patient(s) have slides in more than one split (e.g. p0: test, train)" in caplog.text
    labels.write_text("slide_id,label,patient_id\ns0,pos,p0\ns1,neg,p0\ns2,neg,\ns3,pos,p2\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="tub"):
        load_slides(tmp_path / "bags", labels, "classification")
    assert "1 slide(s) have no patient (e.g. s2) while the others do" in caplog.text
