"""The neuralized kNN and RBF-SVM: exact rewrites, conservation, the SVM identity (spec §2.2, §2.3, §6)."""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.svm import SVC

from tub_knnlrp.data import bundled, standard_split
from tub_knnlrp.explanation import NeuralizedExplainer, explain
from tub_knnlrp.fidelity import svm_identity_residual, svm_midpoint_residual
from tub_knnlrp.rules import eta_svm


@pytest.mark.parametrize("dataset", ["cancer", "digits49"])
@pytest.mark.parametrize("kappa", [0, 1, 2])
def test_knn_midpoint_conserves_smoothed_output(dataset, kappa, request):
    Xtr, Xte, ytr, _ = request.getfixturevalue(dataset)
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    e = explain(knn, Xte, rule="midpoint", kappa=kappa)
    err = np.abs(e.values.sum(axis=1) - e.output) / np.maximum(1.0, np.abs(e.output))
    assert err.max() <= 1e-9
    assert np.abs(e.output).min() > 0  # the test is not about zeros


@pytest.mark.parametrize("dataset", ["cancer", "digits49"])
def test_knn_output_is_the_order_statistic_difference(dataset, request):
    """g at κ = 0 equals d²_(k_d)(neg) − d²_(k_d)(pos), from scikit-learn's own NearestNeighbors."""
    Xtr, Xte, ytr, _ = request.getfixturevalue(dataset)
    knn = KNeighborsClassifier(7).fit(Xtr, ytr)
    e = explain(knn, Xte, rule="midpoint", kappa=0)
    pos, neg = knn.classes_[1], knn.classes_[0]
    d_pos = NearestNeighbors(n_neighbors=4).fit(Xtr[ytr == pos]).kneighbors(Xte)[0][:, 3] ** 2
    d_neg = NearestNeighbors(n_neighbors=4).fit(Xtr[ytr == neg]).kneighbors(Xte)[0][:, 3] ** 2
    np.testing.assert_allclose(e.output, d_neg - d_pos, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dataset", ["cancer", "digits49"])
def test_knn_sign_agrees_with_predict_at_kappa0(dataset, request):
    Xtr, Xte, ytr, _ = request.getfixturevalue(dataset)
    for k in (3, 5, 9):
        knn = KNeighborsClassifier(k).fit(Xtr, ytr)
        e = explain(knn, np.vstack([Xte, Xtr[:100]]), kappa=0)
        assert np.mean((e.output > 0) == (e.prediction == knn.classes_[1])) == 1.0


def test_knn_default_kappa_agreement_is_high_but_reported(cancer):
    Xtr, Xte, ytr, _ = cancer
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    e = explain(knn, Xte)
    agree = np.mean((e.output > 0) == (e.prediction == knn.classes_[1]))
    assert e.kappa == 2
    assert 0.97 <= agree <= 1.0  # spec §6.2: a reference run gives 99.4% on breast_cancer


@pytest.mark.parametrize("gamma", [0.003, 0.03, 0.3])
def test_svm_sign_agrees_with_decision_function(cancer, gamma):
    Xtr, Xte, ytr, _ = cancer
    svc = SVC(C=1.0, gamma=gamma).fit(Xtr, ytr)
    X = np.vstack([Xte, Xtr])
    e = explain(svc, X)
    f = svc.decision_function(X)
    assert np.mean(np.sign(e.output) == np.sign(f)) == 1.0


@pytest.mark.parametrize("gamma", [0.003, 0.03, 0.3])
def test_svm_network_reproduces_decision_function_and_log_ratio(cancer, gamma):
    Xtr, Xte, ytr, _ = cancer
    svc = SVC(C=1.0, gamma=gamma).fit(Xtr, ytr)
    net = NeuralizedExplainer().fit(svc).network(1, 0)
    f = svc.decision_function(Xte)
    np.testing.assert_allclose(net.decision_function(Xte), f, rtol=1e-10, atol=1e-12)
    # g = log(f⁺/f⁻) with the intercept (+1e-10) on its own side
    b = svc.intercept_[0]
    K = np.exp(-gamma * ((Xte[:, None] - svc.support_vectors_[None]) ** 2).sum(-1))
    a = svc.dual_coef_[0]
    f_pos = K[:, a > 0] @ a[a > 0] + (abs(b) + 1e-10 if b >= 0 else 0)
    f_neg = -(K[:, a < 0] @ a[a < 0]) + (abs(b) + 1e-10 if b < 0 else 0)
    np.testing.assert_allclose(net.forward(Xte), np.log(f_pos / f_neg), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.003, 0.03, 0.3])
def test_svm_entropy_identity(cancer, gamma):
    """γ(Σp⁻z⁻ − Σp⁺z⁺) = g − (H(p⁺) − H(p⁻)) to 1e-10 (spec §2.2)."""
    Xtr, Xte, ytr, _ = cancer
    svc = SVC(C=1.0, gamma=gamma).fit(Xtr, ytr)
    net = NeuralizedExplainer().fit(svc).network(1, 0)
    assert svm_identity_residual(net, Xte).max() <= 1e-10
    # and the midpoint relevances account for it exactly once the pooled constants are added back
    assert svm_midpoint_residual(net, Xte).max() <= 1e-10


def test_svm_gi_is_input_times_gradient_over_gamma(cancer):
    """At β = γ the GI relevances are x ⊙ ∇g / γ; checked by central finite differences."""
    Xtr, Xte, ytr, _ = cancer
    svc = SVC(C=1.0, gamma=0.03).fit(Xtr, ytr)
    ex = NeuralizedExplainer(rule="gi").fit(svc)
    net = ex.network(1, 0)
    X = Xte[:5]
    h = 1e-5
    grad = np.zeros_like(X)
    for d in range(X.shape[1]):
        E = np.zeros_like(X)
        E[:, d] = h
        grad[:, d] = (net.forward(X + E) - net.forward(X - E)) / (2 * h)
    np.testing.assert_allclose(ex.transform(X), X * grad / svc.gamma, rtol=1e-5, atol=1e-7)


def test_knn_gi_is_input_times_gradient(cancer):
    Xtr, Xte, ytr, _ = cancer
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    ex = NeuralizedExplainer(rule="gi").fit(knn)
    net = ex.network(1, 0)
    X = Xte[:5]
    h = 1e-6  # small enough that no neighbour set changes
    grad = np.zeros_like(X)
    for d in range(X.shape[1]):
        E = np.zeros_like(X)
        E[:, d] = h
        grad[:, d] = (net.forward(X + E) - net.forward(X - E)) / (2 * h)
    np.testing.assert_allclose(ex.transform(X), X * grad, rtol=1e-5, atol=1e-6)


def test_hybrid_is_the_convex_mixture(cancer):
    Xtr, Xte, ytr, _ = cancer
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    gi = explain(knn, Xte, rule="gi").values
    mid = explain(knn, Xte, rule="midpoint").values
    np.testing.assert_allclose(explain(knn, Xte, rule="hybrid", eta=0.3).values, 0.7 * gi + 0.3 * mid, atol=1e-12)
    assert explain(knn, Xte).eta == 0.8


def test_eta_heuristic_as_published():
    assert eta_svm(10 ** -0.6) == 0.0
    assert eta_svm(10 ** -0.5) == 0.2  # the published jump from 0 to 0.2
    assert eta_svm(1.0) == 0.4
    assert eta_svm(10.0) == 0.8
    assert eta_svm(10 ** 1.6) == 1.0
    assert eta_svm(0.5) == round(0.4 * np.log10(0.5) + 0.4, 2)
    assert eta_svm(0.1, median_sqdist=10.0) == 0.4  # evaluated at γ·m


def test_gamma_scale_and_auto_are_resolved(cancer):
    Xtr, Xte, ytr, _ = cancer
    for gamma, value in (("scale", 1.0 / (Xtr.shape[1] * Xtr.var())), ("auto", 1.0 / Xtr.shape[1])):
        svc = SVC(gamma=gamma).fit(Xtr, ytr)
        net = NeuralizedExplainer().fit(svc).network(1, 0)
        assert net.gamma == pytest.approx(value, rel=1e-12)
        assert np.mean(np.sign(net.forward(Xte)) == np.sign(svc.decision_function(Xte))) == 1.0


def test_inputs_are_not_modified(cancer):
    Xtr, Xte, ytr, _ = cancer
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    X, Xt, yt = Xte.copy(), Xtr.copy(), ytr.copy()
    explain(knn, X, X_train=Xt, y_train=yt)
    assert np.array_equal(X, Xte) and np.array_equal(Xt, Xtr) and np.array_equal(yt, ytr)


def test_explicit_training_set_gives_the_same_result(cancer):
    Xtr, Xte, ytr, _ = cancer
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    a = explain(knn, Xte)
    b = explain(knn, Xte, X_train=Xtr, y_train=ytr)
    np.testing.assert_array_equal(a.values, b.values)


def test_knn_gi_is_the_exact_single_feature_occlusion_of_g_with_frozen_neighbours():
    """Why GI suits mean-baseline flipping (docs/benchmarks/knnlrp.md, wine discussion).

    With the neighbour sets held fixed, g_κ(x) = mean_j ‖x − x_j‖² − mean_i ‖x − x_i‖² is affine in
    x (the ‖x‖² terms cancel), so setting x_d to 0 changes it by exactly 2 x_d (x̄_i,d − x̄_j,d) = R^GI_d,
    which is therefore also the exact Shapley value of that frozen game with baseline 0. Neighbours
    from scikit-learn's NearestNeighbors, independently of the implementation.
    """
    t = bundled("wine01")
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    R = explain(knn, Xte, rule="gi").values  # κ = 2: ranks 1…5 of each class
    sets = {c: Xtr[ytr == c][NearestNeighbors(n_neighbors=5).fit(Xtr[ytr == c]).kneighbors(Xte)[1]] for c in (0, 1)}

    def g_frozen(Z):
        return (((Z[:, None, :] - sets[0]) ** 2).sum(-1).mean(1) - ((Z[:, None, :] - sets[1]) ** 2).sum(-1).mean(1))

    for d in range(Xte.shape[1]):
        Zd = Xte.copy()
        Zd[:, d] = 0.0
        np.testing.assert_allclose(g_frozen(Xte) - g_frozen(Zd), R[:, d], rtol=1e-9, atol=1e-9)
