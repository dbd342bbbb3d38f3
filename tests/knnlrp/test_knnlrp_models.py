"""Multiclass, pipelines, unsupported models, storage without pickle (spec §2.4, §2.5, §4)."""

import re
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectKBest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import SVC

from tub_knnlrp.data import bundled, standard_split
from tub_knnlrp.explanation import NeuralizedExplainer, explain
from tub_knnlrp.models import fit_model, load_model, save_model
from tub_knnlrp.neuralize import MixingTransformWarning, UnsupportedModelError
from tubcli.errors import TubError


@pytest.fixture(scope="module")
def wine():
    t = bundled("wine")
    return standard_split(t.X, t.y)


@pytest.mark.parametrize("multiclass", ["min", "softmin"])
def test_multiclass_knn_explains_predicted_class_and_conserves(wine, multiclass):
    Xtr, Xte, ytr, _ = wine
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    e = explain(knn, Xte, rule="midpoint", multiclass=multiclass, **({"beta_mc": 0.5} if multiclass == "softmin" else {}))
    np.testing.assert_array_equal(e.positive, e.prediction)
    assert np.all(e.negative != e.positive)
    err = np.abs(e.values.sum(axis=1) - e.output) / np.maximum(1.0, np.abs(e.output))
    assert err.max() <= 1e-9
    # the pairwise vote need not equal sklearn's multiclass vote: agreement is high, and reported
    assert 0.9 <= np.mean(e.output > 0) <= 1.0


def test_multiclass_hard_min_picks_the_strongest_competitor(wine):
    Xtr, Xte, ytr, _ = wine
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    ex = NeuralizedExplainer(rule="midpoint", kappa=0).fit(knn)
    e = ex.explain(Xte)
    for i in range(len(Xte)):
        c = int(e.positive[i])
        g = {o: ex.network(c, o).forward(Xte[i : i + 1])[0] for o in range(3) if o != c}
        assert e.output[i] == pytest.approx(min(g.values()), abs=1e-12)
        assert int(e.negative[i]) == min(g, key=g.get)


def test_multiclass_svm_pairs_reproduce_ovo_decision_function(wine):
    Xtr, Xte, ytr, _ = wine
    svc = SVC(gamma=0.05, decision_function_shape="ovo").fit(Xtr, ytr)
    ex = NeuralizedExplainer().fit(svc)
    D = svc.decision_function(Xte)
    col = 0
    for i in range(3):
        for j in range(i + 1, 3):
            np.testing.assert_allclose(ex.network(i, j).decision_function(Xte), D[:, col], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(ex.network(j, i).decision_function(Xte), -D[:, col], rtol=1e-10, atol=1e-12)
            col += 1
    e = ex.explain(Xte)
    assert np.mean(e.output > 0) >= 0.9  # predicted class beats its strongest competitor


def test_binary_labels_can_be_strings():
    t = bundled("breast_cancer")
    y = np.where(t.y == 1, "benign", "malignant")
    Xtr, Xte, ytr, _ = standard_split(t.X, y)
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    e = explain(knn, Xte, kappa=0)
    assert set(e.positive) == {knn.classes_[1]}
    assert np.mean((e.output > 0) == (e.prediction == knn.classes_[1])) == 1.0


@pytest.mark.parametrize("scaler", [StandardScaler, MinMaxScaler])
def test_pipeline_with_scaler_explains_in_model_space(scaler):
    t = bundled("breast_cancer")
    Xtr, Xte = t.X[:400], t.X[400:]
    pipe = make_pipeline(scaler(), KNeighborsClassifier(5)).fit(Xtr, t.y[:400])
    e = explain(pipe, Xte)
    direct = explain(pipe[-1], pipe[0].transform(Xte))
    np.testing.assert_allclose(e.values, direct.values, atol=1e-12)
    np.testing.assert_array_equal(e.data, Xte)  # relevances attached to the original features


def test_pipeline_with_pca_warns_and_uses_transformed_space():
    t = bundled("breast_cancer")
    pipe = make_pipeline(StandardScaler(), PCA(5), KNeighborsClassifier(5)).fit(t.X, t.y)
    with pytest.warns(MixingTransformWarning):
        e = explain(pipe, t.X[:10])
    assert e.values.shape == (10, 5)
    assert e.feature_names[0].lower().startswith("pca")


def test_dataframe_through_a_mixing_pipeline_names_the_transformed_features():
    pd = pytest.importorskip("pandas")
    t = bundled("wine")
    X = pd.DataFrame(t.X, columns=t.feature_names)
    pca = make_pipeline(StandardScaler(), PCA(3), KNeighborsClassifier(5)).fit(X, t.y)
    with pytest.warns(MixingTransformWarning):
        e = explain(pca, X.iloc[:4])  # the DataFrame's 13 columns name the inputs, not the 3 components
    assert e.feature_names == ["pca0", "pca1", "pca2"]
    with pytest.warns(MixingTransformWarning):
        np.testing.assert_allclose(e.values, explain(pca, X.iloc[:4].to_numpy()).values, atol=1e-12)
    select = make_pipeline(SelectKBest(k=4), StandardScaler(), KNeighborsClassifier(5)).fit(X, t.y)
    with pytest.warns(MixingTransformWarning):
        e = explain(select, X.iloc[:4])
    assert e.feature_names == list(select[0].get_feature_names_out())  # the kept columns, not x0..x3
    assert len(set(e.feature_names) - set(t.feature_names)) == 0
    with pytest.raises(UnsupportedModelError, match="2 feature names given for 13 input features"):
        explain(select, X.iloc[:4].to_numpy(), feature_names=["a", "b"])


def test_imputer_pipeline_is_per_feature_and_explains_rows_with_missing_values(wine):
    Xtr, Xte, ytr, _ = wine
    pipe = make_pipeline(make_pipeline(SimpleImputer(), StandardScaler()), KNeighborsClassifier(5)).fit(Xtr, ytr)
    holes = Xte[:5].copy()
    holes[0, 2] = holes[3, 7] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixingTransformWarning)  # nested scalers and an imputer mix nothing
        e = explain(pipe, holes, rule="midpoint")
    np.testing.assert_array_equal(e.prediction, pipe.predict(holes))
    filled = pipe[0].transform(holes)
    np.testing.assert_allclose(e.values, explain(pipe[-1], filled, rule="midpoint").values, atol=1e-12)
    with pytest.raises(ValueError, match="infinite"):
        explain(pipe, np.where(np.isnan(holes), np.inf, holes))


def test_a_training_set_that_is_not_the_fitted_one_is_refused(wine):
    Xtr, Xte, ytr, _ = wine
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier(5)).fit(Xtr, ytr)
    order = np.random.default_rng(0).permutation(len(Xtr))  # the same set in another order is fine
    np.testing.assert_allclose(explain(knn, Xte, X_train=Xtr[order], y_train=ytr[order]).values,
                               explain(knn, Xte).values, atol=1e-12)
    with pytest.raises(UnsupportedModelError, match="fitted on"):
        explain(knn, Xte, X_train=Xtr[:60], y_train=ytr[:60])
    other = ytr.copy()
    other[:3] = (other[:3] + 1) % 3
    with pytest.raises(UnsupportedModelError, match="not the set the kNN was fitted on"):
        explain(knn, Xte, X_train=Xtr, y_train=other)


def test_svm_default_eta_without_the_training_set_warns(wine):
    Xtr, Xte, ytr, _ = wine
    svc = make_pipeline(StandardScaler(), SVC(gamma=0.05)).fit(Xtr, ytr)
    with pytest.warns(UserWarning, match="support vectors"):
        fallback = explain(svc, Xte)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = explain(svc, Xte, X_train=Xtr, y_train=ytr)  # the training-set median (the CLI's η)
        explain(svc, Xte, eta=0.5)
    from tub_knnlrp.rules import eta_svm, median_pairwise_sqdist

    assert spec.eta == eta_svm(0.05, median_pairwise_sqdist(svc[0].transform(Xtr)))
    assert fallback.eta == eta_svm(0.05, median_pairwise_sqdist(svc[-1].support_vectors_))


@pytest.mark.parametrize(
    "model, words",
    [
        (KNeighborsClassifier(5, weights="distance"), "weights"),
        (KNeighborsClassifier(5, metric="manhattan"), "metric 'manhattan' is not supported"),
        (KNeighborsClassifier(5, p=3), "metric 'minkowski' (p=3) is not supported"),
        (KNeighborsClassifier(5, metric="seuclidean", metric_params={"V": np.ones(4)}),
         "metric 'seuclidean' (metric_params 'V') is not supported"),
        (KNeighborsClassifier(4), "odd"),
        (SVC(kernel="linear"), "kernel"),
        (LogisticRegression(), "not supported"),
    ],
)
def test_unsupported_models_raise_one_line_errors(model, words):
    t = bundled("iris_binary")
    model.fit(t.X, t.y)
    with pytest.raises(UnsupportedModelError) as info:
        explain(model, t.X)
    msg = str(info.value)
    assert words in msg and "\n" not in msg
    assert isinstance(info.value, TubError)


def test_sqeuclidean_knn_is_the_euclidean_one():
    """Squared distances rank the neighbours as Euclidean ones: the same classifier, the same relevances."""
    t = bundled("iris_binary")
    a = explain(KNeighborsClassifier(5).fit(t.X, t.y), t.X)
    b = explain(KNeighborsClassifier(5, metric="sqeuclidean").fit(t.X, t.y), t.X)
    np.testing.assert_array_equal(a.values, b.values)


@pytest.mark.parametrize("call, words", [
    (lambda t: explain(KNeighborsClassifier(1).fit(t.X[:10], ["a"] * 10), t.X[:2]), "fitted on one class ('a')"),
    (lambda t: explain(KNeighborsClassifier(5).fit(t.X, t.y), t.X, with_intercept=False), "a kNN has none"),
    # the sklearn habit fit(X, y): string labels were converted as if they were X_train ("could not convert")
    (lambda t: NeuralizedExplainer().fit(t.X, np.array(["x", "y"] * (len(t.X) // 2))), "ndarray is not supported"),
])
def test_settings_and_models_without_a_meaning_are_named(call, words):
    t = bundled("iris_binary")
    with pytest.raises((UnsupportedModelError, ValueError), match=re.escape(words)):
        call(t)


def test_a_dataframe_with_another_number_of_columns_is_named_as_such():
    pd = pytest.importorskip("pandas")
    t = bundled("iris_binary")
    knn = KNeighborsClassifier(5).fit(t.X, t.y)
    with pytest.raises(ValueError, match="X has 5 columns, the model expects 4"):  # was "5 feature names given"
        explain(knn, pd.DataFrame(t.X, columns=list("abcd")).assign(z=1.0))


def test_to_shap_warns_where_the_values_do_not_add_up_to_g():
    pytest.importorskip("shap")
    t = bundled("iris_binary")
    knn = KNeighborsClassifier(5).fit(t.X, t.y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(knn, t.X[:3], rule="midpoint").to_shap()  # conservative: silent
    with pytest.warns(UserWarning, match="do not add up"):
        explain(SVC().fit(t.X, t.y), t.X[:3], rule="midpoint", eta=None).to_shap()
    with pytest.warns(UserWarning, match="do not add up"):
        explain(knn, t.X[:3], rule="hybrid").to_shap()


def test_an_explanation_prints_its_settings_not_its_arrays():
    t = bundled("iris_binary")
    e = explain(KNeighborsClassifier(5).fit(t.X, t.y), t.X)
    assert repr(e) == "Explanation(kind='knn', rule='hybrid', eta=0.8, kappa=2, rows=100, features=4)"


def test_unfitted_model_is_an_error():
    with pytest.raises(UnsupportedModelError, match="not fitted"):
        explain(KNeighborsClassifier(5), np.zeros((2, 3)))


def test_too_few_points_per_class_is_an_error():
    X = np.random.default_rng(0).normal(size=(12, 2))
    y = np.array([0] * 8 + [1] * 4)
    knn = KNeighborsClassifier(5).fit(X, y)
    with pytest.raises(ValueError, match="needs at least 5 per class"):
        explain(knn, X)  # κ = 2 needs ranks 1..5 in each class
    assert explain(knn, X, kappa=0).values.shape == (12, 2)  # κ = 0 needs rank 3 only


def test_a_small_class_of_a_multiclass_knn_is_named_with_the_kappa_that_works():
    X, y = load_iris(return_X_y=True)
    keep = np.r_[np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:3]]
    knn = KNeighborsClassifier(5).fit(X[keep], y[keep])
    with pytest.raises(ValueError, match="class 2 has 3 training point.*pass kappa=0"):
        explain(knn, X[:3])  # rows of class 0 too: min pooling compares against every other class
    assert explain(knn, X[:3], kappa=0).values.shape == (3, 4)


def test_a_class_below_the_decisive_count_is_told_a_k_that_works_with_the_default_kappa():
    X = np.random.default_rng(0).normal(size=(12, 2))
    y = np.array([0] * 10 + [1] * 2)
    knn = KNeighborsClassifier(5).fit(X, y)
    with pytest.raises(ValueError, match=r"k <= 1 \(default kappa\), or k <= 3 with kappa=0"):
        explain(knn, X)
    assert explain(KNeighborsClassifier(1).fit(X, y), X).values.shape == (12, 2)  # both advices hold
    assert explain(KNeighborsClassifier(3).fit(X, y), X, kappa=0).values.shape == (12, 2)


def test_a_column_transformer_of_scalers_is_per_feature_and_keeps_the_input_names():
    pd = pytest.importorskip("pandas")
    from sklearn.compose import make_column_transformer

    t = bundled("wine01")
    df = pd.DataFrame(t.X[:, :4], columns=t.feature_names[:4])
    blocks = make_column_transformer((StandardScaler(), list(df.columns[:2])), (MinMaxScaler(), list(df.columns[2:])))
    pipe = make_pipeline(blocks, KNeighborsClassifier(5)).fit(df, t.y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixingTransformWarning)
        e = explain(pipe, df[:10])
    assert e.feature_names == list(df.columns)
    np.testing.assert_allclose(e.values, explain(pipe[-1], blocks.transform(df[:10])).values, atol=1e-12)
    # columns moved by the transformer (remainder last) mix the order: the transformed space, with a warning
    moved = make_pipeline(make_column_transformer((StandardScaler(), [df.columns[1]]), remainder="passthrough"),
                          KNeighborsClassifier(5)).fit(df, t.y)
    with pytest.warns(MixingTransformWarning):
        explain(moved, df[:3])


def test_api_misuse_is_an_error_not_ignored():
    import pandas as pd
    from sklearn.exceptions import NotFittedError

    X, y = load_iris(return_X_y=True)
    knn, svc = KNeighborsClassifier(5).fit(X, y), SVC(gamma=0.5).fit(X, y)
    with pytest.raises(UnsupportedModelError, match="X_train has 2 features but the SVC was fitted on 4"):
        explain(svc, X[:3], X_train=X[:, :2])  # it would set the default eta from other data
    with pytest.raises(ValueError, match="beta is the SVM's"):
        explain(knn, X[:3], beta=1e-9)
    # eta with gi/midpoint and beta_mc with the hard min were ignored (config.yaml recorded them as used)
    with pytest.raises(ValueError, match="eta mixes the hybrid rule; the gi rule is η = 0"):
        explain(knn, X[:3], rule="gi", eta=0.1)
    with pytest.raises(ValueError, match="beta_mc is the stiffness of the softmin"):
        explain(knn, X[:3], beta_mc=3.0)
    assert explain(knn, X[:3], rule="hybrid", eta=0.1).values.shape == (3, 4)
    with pytest.raises(UnsupportedModelError, match="y_train was given without X_train"):
        explain(knn, X[:3], y_train=y)
    with pytest.raises(NotFittedError):
        NeuralizedExplainer().explain(X)
    with pytest.raises(NotFittedError, match="call fit.model. first: explain.X. and transform.X."):
        NeuralizedExplainer().transform(X)  # named the method it was not
    frame = pd.DataFrame(X[:3]).astype("Float64")  # pandas' nullable dtype
    assert np.allclose(explain(knn, frame).values, explain(knn, X[:3]).values)
    frame.iloc[0, 0] = pd.NA
    with pytest.raises(ValueError, match="NaN or infinite values; impute"):
        explain(knn, frame)


@pytest.mark.parametrize("kind, params", [("knn", {"k": 5}), ("svm", {"gamma": 0.1, "C": 1.0})])
def test_stored_model_round_trips_without_pickle(tmp_path, kind, params):
    t = bundled("wine01")
    tm = fit_model(t.X, t.y, kind=kind, feature_names=t.feature_names, **params)
    st, js = save_model(tm, tmp_path)
    assert b"pickle" not in st.read_bytes()[:200]
    again = load_model(tmp_path)
    np.testing.assert_array_equal(again.pipeline.predict(t.X), tm.pipeline.predict(t.X))
    a = explain(tm.pipeline, t.X[:20], X_train=tm.X_train, y_train=tm.y_train)
    b = explain(again.pipeline, t.X[:20], X_train=again.X_train, y_train=again.y_train)
    np.testing.assert_array_equal(a.values, b.values)
    assert again.feature_names == t.feature_names


def test_identical_models_give_identical_files(tmp_path):
    """safetensors wrote its two metadata keys in a random order: identical runs differed in bytes."""
    t = bundled("wine01")
    tm = fit_model(t.X, t.y, kind="knn", k=5)
    saved = {save_model(tm, tmp_path / str(i))[0].read_bytes() for i in range(8)}
    assert len(saved) == 1


def test_tampered_svm_model_is_detected(tmp_path):
    from safetensors.numpy import load_file, save_file

    t = bundled("wine01")
    tm = fit_model(t.X, t.y, kind="svm", gamma=0.1, C=1.0)
    st, _ = save_model(tm, tmp_path)
    arrays = load_file(str(st))
    arrays["svm.dual_coef"] = arrays["svm.dual_coef"] * 1.01
    save_file(arrays, str(st), metadata={"format": "tub-knnlrp/1"})
    with pytest.raises(TubError, match="does not reproduce"):
        load_model(tmp_path)


def test_pickle_needs_explicit_permission(tmp_path):
    import joblib

    t = bundled("iris_binary")
    path = tmp_path / "m.joblib"
    joblib.dump(KNeighborsClassifier(3).fit(t.X, t.y), path)
    with pytest.raises(TubError, match="executes code"):
        load_model(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tm = load_model(path, allow_pickle=True)
    assert any("executes code" in str(w.message) for w in caught)
    assert tm.kind == "knn"


def test_grid_search_picks_an_odd_k():
    t = bundled("iris_binary")
    tm = fit_model(t.X, t.y, kind="knn")
    assert tm.params["k"] % 2 == 1 and 3 <= tm.params["k"] <= 27
    assert 0.8 < tm.cv_score <= 1.0


def test_to_shap_gives_a_shap_explanation():
    shap = pytest.importorskip("shap")
    t = bundled("iris_binary")
    knn = KNeighborsClassifier(5).fit(t.X, t.y)
    e = explain(knn, t.X[:7], feature_names=["a", "b", "c", "d"])
    s = e.to_shap()
    assert isinstance(s, shap.Explanation)
    assert s.values.shape == (7, 4) and list(s.feature_names) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(s.base_values, np.zeros(7))


def test_dataframe_input_keeps_feature_names_without_warnings():
    pd = pytest.importorskip("pandas")
    t = bundled("wine01")
    df = pd.DataFrame(t.X, columns=t.feature_names)
    pipe = make_pipeline(StandardScaler(), KNeighborsClassifier(5)).fit(df, t.y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = explain(pipe, df.iloc[:5])
    assert e.feature_names == t.feature_names


@pytest.mark.parametrize("kw", [{"metric": "l2"}, {"metric": "minkowski", "p": 2}, {"metric": "euclidean"}])
def test_euclidean_metric_aliases_are_accepted(kw):
    t = bundled("iris_binary")
    a = explain(KNeighborsClassifier(5, **kw).fit(t.X, t.y), t.X[:10])
    b = explain(KNeighborsClassifier(5).fit(t.X, t.y), t.X[:10])
    np.testing.assert_array_equal(a.values, b.values)


def test_manhattan_message_does_not_claim_p2():
    t = bundled("iris_binary")
    with pytest.raises(UnsupportedModelError) as info:
        explain(KNeighborsClassifier(5, metric="manhattan").fit(t.X, t.y), t.X)
    assert "p=2)" not in str(info.value).split(";")[0]


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"beta": -1.0}, "beta must be a number > 0"),
        ({"kappa": 1.7}, "kappa must be an integer"),
        ({"kappa": -1}, "kappa must be an integer >= 0"),
        ({"eta": 1.5}, "eta must be a number in"),
        ({"beta_mc": 0.0}, "beta_mc must be a number > 0"),
    ],
)
def test_explainer_parameters_are_validated(kw, words):
    t = bundled("iris_binary")
    model = SVC(gamma=0.1).fit(t.X, t.y) if "beta" in kw else KNeighborsClassifier(5).fit(t.X, t.y)
    with pytest.raises(ValueError, match=words):
        explain(model, t.X[:5], **kw)


def test_explainer_is_a_scikit_learn_estimator():
    from sklearn.base import clone

    ex = NeuralizedExplainer(rule="midpoint", kappa=1)
    assert clone(ex).get_params() == ex.get_params()
    assert ex.set_params(kappa=0).kappa == 0


def test_sparse_input_is_a_clear_error():
    sparse = pytest.importorskip("scipy.sparse")
    t = bundled("iris_binary")
    knn = KNeighborsClassifier(5).fit(t.X, t.y)
    with pytest.raises(UnsupportedModelError, match=r"sparse matrix; pass a dense array \(X.toarray\(\)\)"):
        explain(knn, sparse.csr_matrix(t.X[:5]))
    with pytest.raises(UnsupportedModelError, match="fitted on a sparse matrix"):
        explain(KNeighborsClassifier(5).fit(sparse.csr_matrix(t.X), t.y), t.X[:5])


def test_svm_on_identical_rows_asks_for_eta():
    X, y = np.ones((10, 2)), np.arange(10) % 2
    svc = SVC().fit(X, y)
    with pytest.raises(ValueError, match="pass eta explicitly"):
        explain(svc, X)
    assert explain(svc, X, rule="midpoint").eta == 1.0  # the η heuristic is only needed by the hybrid rule
    assert explain(svc, X, eta=0.5).values.shape == (10, 2)


def test_options_of_the_other_model_are_errors():
    t = bundled("iris_binary")
    with pytest.raises(TubError, match="--k: not used by --model svm"):
        fit_model(t.X, t.y, kind="svm", k=4, gamma=0.1, C=1.0)
    with pytest.raises(TubError, match="--gamma, --C: not used by --model knn"):
        fit_model(t.X, t.y, kind="knn", k=5, gamma=0.1, C=1.0)
    svc = SVC(gamma=0.1).fit(t.X, t.y)  # kappa is the kNN's, as beta is the SVM's: refused, not ignored
    with pytest.raises(ValueError, match="kappa is the kNN's rank half-window; an SVM has none"):
        explain(svc, t.X[:2], kappa=1)


def _edit(meta: dict, arrays: dict, case: str):
    if case == "no params":
        del meta["params"]
    elif case == "json list":
        meta = [meta]
    elif case == "fewer classes":
        meta["classes"] = meta["classes"][:1]
    elif case == "swapped classes":
        meta["classes"] = meta["classes"][::-1]
    elif case == "other scaler":
        meta["scaler"] = "minmax"
    elif case == "extra parameter":
        meta["params"]["p"] = 1
    elif case == "even k":
        meta["params"]["k"] = 4
    elif case == "k above the rows":
        meta["params"]["k"] = 31
    elif case == "no y_train":
        del arrays["y_train"]
    elif case == "y_train rows":
        arrays["y_train"] = arrays["y_train"][:-1]
    return meta, arrays


@pytest.mark.parametrize("case", ["no params", "json list", "fewer classes", "swapped classes", "other scaler",
                                  "extra parameter", "even k", "k above the rows", "no y_train",
                                  "y_train rows"])
def test_edited_model_files_are_one_line_errors(tmp_path, case):
    import json

    from safetensors.numpy import load_file, save_file

    X = np.random.default_rng(0).normal(size=(30, 3))
    st, js = save_model(fit_model(X, (X[:, 0] > 0).astype(int), kind="knn", k=3), tmp_path)
    meta, arrays = _edit(json.loads(js.read_text()), load_file(str(st)), case)
    js.write_text(json.dumps(meta))
    save_file(arrays, str(st), metadata={"format": "tub-knnlrp/1"})
    with pytest.raises(TubError, match="is not a valid tub-knnlrp model: .*; retrain it") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("edit", [("params", {"k": 5}), ("feature_names", ["c", "b", "a"])])
def test_a_valid_looking_edit_of_model_json_is_refused(tmp_path, edit):
    import json

    X = np.random.default_rng(0).normal(size=(30, 3))
    st, js = save_model(fit_model(X, (X[:, 0] > 0).astype(int), kind="knn", k=3, feature_names=["a", "b", "c"]),
                        tmp_path)
    assert load_model(tmp_path).params == {"k": 3}
    meta = json.loads(js.read_text())
    meta[edit[0]] = edit[1]  # well-formed, so only the digest in model.safetensors can tell
    js.write_text(json.dumps(meta))
    with pytest.raises(TubError, match="not a valid tub-knnlrp model: .*edited after training"):
        load_model(tmp_path)


def test_a_pickle_that_is_no_model_is_named(tmp_path):
    import joblib

    path = tmp_path / "d.joblib"
    joblib.dump({"a": 1}, path)
    with pytest.warns(UserWarning, match="executes code"), pytest.raises(TubError, match="holds an object of type dict, not a"):
        load_model(path, allow_pickle=True)
