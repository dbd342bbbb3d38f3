"""Shapley values, KDE in-painting and feature flipping (spec §2.6, §2.7, §6.3, §6.6)."""

import itertools
import math

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from tub_knnlrp import baselines
from tub_knnlrp.data import bundled, standard_split
from tub_knnlrp.flipping import FlippingEvaluation, aupc, flip_curves, row_aupc
from tub_knnlrp.kde import GaussianKDE
from tub_knnlrp.networks import NeuralizedKNN
from tub_knnlrp.rules import midpoint_relevance


def shapley_by_permutations(f, x, base):
    """Shapley values from their definition: the mean marginal contribution over all orderings."""
    d = len(x)
    phi = np.zeros(d)
    for perm in itertools.permutations(range(d)):
        z = base.copy()
        prev = f(z[None])[0]
        for j in perm:
            z[j] = x[j]
            cur = f(z[None])[0]
            phi[j] += cur - prev
            prev = cur
    return phi / math.factorial(d)


def test_exact_shapley_matches_the_permutation_definition():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(5, 5))

    def f(X):  # a non-additive function with interactions
        return np.tanh(X @ W).sum(axis=1) * X[:, 0] + X[:, 1] * X[:, 2] ** 2

    Z, base = rng.normal(size=(3, 5)), rng.normal(size=5)
    phi = baselines.exact_shapley(lambda X, rows: f(X), Z, base)
    for r in range(3):
        np.testing.assert_allclose(phi[r], shapley_by_permutations(f, Z[r], base), atol=1e-12)
    np.testing.assert_allclose(phi.sum(axis=1), f(Z) - f(base[None]), atol=1e-12)  # efficiency


@pytest.mark.parametrize("name", ["iris_binary", "wine01"])
def test_midpoint_rule_is_the_exact_shapley_value_of_a_detection_unit(name):
    """Spec §6.6: h(x) = w·(x − m), w = 2(x_i − x_j); Shapley values with baseline m = midpoint R."""
    t = bundled(name)
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    xi, xj = Xtr[ytr == ytr.max()][0], Xtr[ytr == ytr.min()][0]
    w, m = 2 * (xi - xj), (xi + xj) / 2
    unit = NeuralizedKNN(xi[None], xj[None], k=1, kappa=0)  # one pair: one detection unit
    R = midpoint_relevance(unit.moments(Xte[:10]))
    phi = baselines.exact_shapley(lambda X, rows: (X - m) @ w, Xte[:10], m)
    np.testing.assert_allclose(R, phi, atol=1e-8)
    np.testing.assert_allclose(R.sum(axis=1), unit.forward(Xte[:10]), atol=1e-10)


def test_kde_fixed_point_and_no_side_effects():
    X = bundled("wine01").X[:, :4].copy()
    before = X.copy()
    state = np.random.get_state()[1].copy()
    kde = GaussianKDE(max_points=100, seed=3).fit(X)
    assert np.array_equal(X, before)  # the caller's array is untouched
    assert np.array_equal(np.random.get_state()[1], state)  # no global seeding
    N, D = kde.points_.shape
    assert len(np.unique(kde.points_, axis=0)) == N  # subset drawn without replacement, no duplicates
    # s is a fixed point: one more update leaves it (almost) unchanged, and beats the start
    from scipy.special import softmax

    from tub_knnlrp.networks import squared_distances

    from scipy.special import logsumexp

    full = squared_distances(kde.points_, kde.points_)
    d = full[~np.eye(N, dtype=bool)].reshape(N, N - 1)
    w = softmax(-kde.scale_ * d, axis=1)
    s_next = 1 / (2 * (w * d).sum() / (N * D))
    assert s_next == pytest.approx(kde.scale_, rel=1e-3)

    def loo(s):
        return np.sum(logsumexp(-s * d, axis=1) - np.log(N - 1) + 0.5 * D * np.log(s / np.pi))

    assert loo(kde.scale_) > loo(1 / d.mean())
    # the fit's blockwise pass (blocks of 7 rows here) equals the plain formulas on the (N, N-1) matrix
    loss, sigma2 = kde._loo_and_variance(full, kde.scale_, D, cells=7 * N)
    assert loss == pytest.approx(loo(kde.scale_), rel=1e-12)
    assert 1 / (2 * sigma2) == pytest.approx(s_next, rel=1e-12)


def test_kde_conditional_samples_keep_kept_features():
    X = bundled("wine01").X
    Xs = (X - X.mean(0)) / X.std(0)
    kde = GaussianKDE(seed=0).fit(Xs)
    removed = np.zeros(13, dtype=bool)
    removed[[1, 4, 7]] = True
    S = kde.sample_removed(Xs[0], [removed, np.zeros(13, dtype=bool)], 50, np.random.default_rng(0))
    assert S.shape == (2, 50, 13)
    np.testing.assert_array_equal(S[0][:, ~removed], np.broadcast_to(Xs[0][~removed], (50, 10)))
    assert S[0][:, removed].std(axis=0).min() > 0
    np.testing.assert_array_equal(S[1], np.broadcast_to(Xs[0], (50, 13)))


def test_aupc_trapezoid():
    assert aupc(np.array([1.0, 0.0])) == pytest.approx(0.5)
    assert aupc(np.array([1.0, 1.0, 0.0])) == pytest.approx(0.75)
    assert aupc(np.array([2.0, 1.0, 0.0]), normalise=True) == pytest.approx(0.5)


def test_row_aupc_averages_to_the_aupc_of_the_mean_curve():
    curves = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, -0.5, 0.0]])
    np.testing.assert_allclose(row_aupc(curves), [0.25, 1.0, -0.125])
    assert row_aupc(curves).mean() == pytest.approx(aupc(curves.mean(0)), abs=1e-15)


class LinearScore:
    """F(x) = w·x with class index ignored: the best order is by w_d x_d."""

    def __init__(self, w):
        self.w = w

    def __call__(self, X, c):
        return X @ self.w


def test_flipping_prefers_the_true_contributions_and_keeps_the_end_point():
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)
    Z = rng.normal(size=(20, 8))
    score = LinearScore(w)
    true = Z * w
    good = flip_curves(score, Z, np.zeros(20, int), true, np.zeros(8))
    bad = flip_curves(score, Z, np.zeros(20, int), -true, np.zeros(8))
    assert good.shape == (20, 9)
    np.testing.assert_allclose(good[:, -1], 0.0, atol=1e-12)  # fully flipped end point recorded
    assert aupc(good.mean(0)) < aupc(bad.mean(0))


def test_hard_score_with_01_labels_is_not_identically_zero():
    t = bundled("iris_binary")
    y01 = (t.y == 2).astype(int)
    Xtr, Xte, ytr, _ = standard_split(t.X, y01)
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    ev = FlippingEvaluation(knn, Xtr, ytr, score="hard")
    res = ev.run(Xte, ["lrp"])
    assert res["lrp"].curve[0] == pytest.approx(1.0)  # every row starts at its own prediction
    assert res["lrp"].curve[-1] < 1.0


@pytest.fixture(scope="module")
def cancer_eval():
    t = bundled("breast_cancer")
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    return FlippingEvaluation(knn, Xtr, ytr), Xte[:60]


def test_knn_lrp_beats_occlusion_by_feature_flipping(cancer_eval):
    """Spec §6.3 on breast_cancer (first 60 test rows): kNN-LRP ≤ 0.5 × occlusion.

    Recorded run (2-core CPU): lrp 0.178, occlusion 0.711, random 0.708 (reference: 0.178, 0.707, 0.725).
    """
    ev, Z = cancer_eval
    res = ev.run(Z, ["lrp", "occlusion", "random"])
    assert res["lrp"].aupc == pytest.approx(0.178, abs=0.005)
    assert res["lrp"].aupc <= 0.5 * res["occlusion"].aupc
    assert res["lrp"].aupc < res["random"].aupc
    rows = res["lrp"].extra["row_aupc"]  # per-row values for paired comparisons
    assert rows.shape == (60,) and rows.mean() == pytest.approx(res["lrp"].aupc, abs=1e-12)


def test_kde_inpainting_flipping_runs_and_ranks_lrp_above_random(cancer_eval):
    ev, Z = cancer_eval
    kev = FlippingEvaluation(ev.estimator, ev.Z_train, ev.y_train, replacement="kde", n_samples=10)
    res = kev.run(Z[:15], ["lrp", "random"])
    assert res["lrp"].aupc_normalised < res["random"].aupc_normalised


def test_svm_baselines_gradient_is_analytic():
    t = bundled("wine01")
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    svc = SVC(gamma=0.1).fit(Xtr, ytr)
    ev = FlippingEvaluation(svc, Xtr, ytr)
    _, c, comp, s = ev.context(Xte[:4])
    g = baselines.svm_score_gradient(ev.network, Xte[:4], c, comp)
    h = 1e-6
    for d in range(3):
        E = np.zeros_like(Xte[:4])
        E[:, d] = h
        num = (ev.score.soft(Xte[:4] + E, c) - ev.score.soft(Xte[:4] - E, c)) / (2 * h)
        np.testing.assert_allclose(g[:, d], num, rtol=1e-5, atol=1e-8)
    # IG satisfies completeness: Σ_d IG_d = F(x) − F(baseline) (midpoint rule, 50 steps)
    ig = baselines.integrated_gradients(ev.network, Xte[:4], c, comp, ev.baseline, steps=200)
    np.testing.assert_allclose(ig.sum(1), ev.score.soft(Xte[:4], c) - ev.score.soft(np.tile(ev.baseline, (4, 1)), c),
                               rtol=1e-3, atol=1e-4)


def test_gradient_baselines_take_the_zero_reference_also_without_standard_scaling():
    """Spec §2.7: GI is x ⊙ ∇f and IG integrates from 0. The flipping baseline (the training mean) is the
    same point only after a StandardScaler; on unscaled features the two used to be mixed up."""
    from sklearn.model_selection import train_test_split

    t = bundled("wine01")
    Xtr, Xte, ytr, _ = train_test_split(t.X, t.y, test_size=0.3, random_state=0, stratify=t.y)
    top = Xtr.max(0)
    Xtr, Xte = Xtr / top, Xte / top  # positive features in [0, 1] (MinMax-like), mean far from 0
    ev = FlippingEvaluation(SVC(gamma=1.0).fit(Xtr, ytr), Xtr, ytr)
    assert np.abs(ev.baseline).max() > 0.1
    Z = Xte[:4]
    _, c, comp, s = ev.context(Z)
    gi = ev.relevance("grad_x_input", Z, c, comp, s)
    np.testing.assert_allclose(gi, Z * baselines.svm_score_gradient(ev.network, Z, c, comp), rtol=1e-12)
    ig = ev.relevance("ig", Z, c, comp, s)  # completeness against F(0), not F(mean)
    np.testing.assert_allclose(ig.sum(1), ev.score.soft(Z, c) - ev.score.soft(np.zeros_like(Z), c), rtol=2e-2,
                               atol=1e-3)


def test_all_default_methods_run_on_wine():
    t = bundled("wine01")
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    ev = FlippingEvaluation(SVC(gamma=0.1).fit(Xtr, ytr), Xtr, ytr, nsamples_shap=50)
    methods = [m for m in ev.available(13) if m != "kernelshap"] + ["lrp_eta0.5"]
    res = ev.run(Xte[:5], methods)
    assert set(res) == set(methods)
    assert all(np.isfinite(r.aupc) for r in res.values())


def test_knn_lrp_beats_occlusion_on_digits_4_vs_9():
    """Recorded run (2-core CPU): lrp 0.017, occlusion 0.780 (reference: 0.015, 0.779)."""
    t = bundled("digits49")
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    ev = FlippingEvaluation(KNeighborsClassifier(5).fit(Xtr, ytr), Xtr, ytr)
    res = ev.run(Xte[:60], ["lrp", "occlusion"])
    assert res["lrp"].aupc == pytest.approx(0.017, abs=0.005)
    assert res["lrp"].aupc <= 0.5 * res["occlusion"].aupc


@pytest.mark.slow
@pytest.mark.parametrize("name, beats_shap", [("breast_cancer", True), ("digits49", True), ("wine01", False)])
def test_flipping_bar_against_kernelshap(name, beats_shap):
    """Spec §6.3 in full (about 15 s per data set): kNN-LRP ≤ 0.5 × occlusion, and vs KernelSHAP.

    Recorded (benchmarks/knnlrp.py, 2-core CPU): KernelSHAP 0.277 / 0.716 / 0.130 against kNN-LRP
    0.178 / 0.017 / 0.204; on wine 0/1 KernelSHAP wins with the mean baseline.
    """
    pytest.importorskip("shap")
    t = bundled(name)
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    ev = FlippingEvaluation(KNeighborsClassifier(5).fit(Xtr, ytr), Xtr, ytr)
    res = ev.run(Xte[:60], ["lrp", "occlusion", "kernelshap"])
    assert res["lrp"].aupc <= 0.5 * res["occlusion"].aupc
    assert (res["lrp"].aupc < res["kernelshap"].aupc) == beats_shap


def test_kernelshap_on_fewer_training_rows_than_background_centres():
    """shap.kmeans needs at least as many rows as centres: a 6-row training set uses every row."""
    pytest.importorskip("shap")
    X = np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 1], [2, 2]], dtype=float)
    y = np.array([0, 1, 0, 1, 0, 1])
    ev = FlippingEvaluation(KNeighborsClassifier(3).fit(X, y), X, y)
    res = ev.run(X[:3], ["kernelshap", "random"])
    assert np.isfinite(res["kernelshap"].aupc)


def test_occlusion_relevance_is_the_soft_score_difference_also_for_hard_curves():
    """Spec §2.7: occlusion is F(x) − F(x with x_d ← baseline_d) with F the soft score, whichever score the
    curves use (with the hard ±1 score almost every occlusion relevance was 0: features flipped in column order)."""
    t = bundled("breast_cancer")
    Xtr, Xte, ytr, _ = standard_split(t.X, t.y)
    m, s = Xtr.mean(0), Xtr.std(0)
    Ztr, Z = (Xtr - m) / s, ((Xte - m) / s)[:15]
    svc = SVC(gamma=0.03).fit(Ztr, ytr)
    hard = FlippingEvaluation(svc, Ztr, ytr, score="hard").run(Z, ["occlusion"])["occlusion"]
    soft = FlippingEvaluation(svc, Ztr, ytr, score="soft").run(Z, ["occlusion"])["occlusion"]
    np.testing.assert_allclose(hard.extra["relevance"], soft.extra["relevance"], rtol=1e-12)
    c = np.searchsorted(svc.classes_, svc.predict(Z))
    sign = np.where(c == 1, 1.0, -1.0)  # the predicted class's soft score is ±decision_function
    d = 5
    occluded = Z.copy()
    occluded[:, d] = Ztr.mean(0)[d]
    want = sign * (svc.decision_function(Z) - svc.decision_function(occluded))
    np.testing.assert_allclose(soft.extra["relevance"][:, d], want, rtol=1e-9, atol=1e-12)
    assert np.mean(soft.extra["relevance"] == 0) < 0.01


def test_variance_prior_ties_after_a_standard_scaler_keep_the_column_order():
    """After a StandardScaler every variance is 1 ± 1e-15: the order must not come from those bits."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 6)) * [1, 5, 0.1, 3, 2, 7]
    for perm in (np.arange(200), rng.permutation(200)):
        Xp = X[perm]
        Z = (Xp - Xp.mean(0)) / Xp.std(0)
        R = baselines.variance_prior(Z[:3], Z)
        assert (R == R[0, 0]).all()  # one tie: flipped in column order, the same for any row order
    R = baselines.variance_prior(X[:2], X)
    assert list(np.argsort(-R[0], kind="stable")) == [5, 1, 3, 4, 0, 2]


def test_kde_on_rows_that_all_repeat_is_an_error_not_a_nan_bandwidth():
    """Each row's nearest neighbour was itself: the LOO fixed point went to s = inf and NaN without a word."""
    from tubcli.errors import TubError

    X = np.repeat(np.random.default_rng(0).standard_normal((20, 3)), 10, axis=0)
    with pytest.raises(TubError, match="bandwidth collapses to 0: 180 of its 200 training rows repeat"):
        GaussianKDE().fit(X)
