"""Row blocking of the neuralized networks: explaining rows in small blocks gives the single-block result.

The networks process the explained rows in blocks sized from a memory budget
(``tub_knnlrp.networks.BLOCK_BYTES``), so memory no longer grows with rows × training points. Here the
block size is forced to a few rows (``BLOCK_ROWS``) and compared with one block holding every row.
The kNN path has no BLAS call and must be bit-identical; the SVM's pooled moments go through matrix
products whose rounding may depend on the block's row count, so they are compared to 1e-12.
"""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

import tub_knnlrp.networks as networks
from tub_knnlrp.data import bundled, standard_split
from tub_knnlrp.explanation import explain
from tub_knnlrp.fidelity import svm_identity_residual, svm_midpoint_residual
from tub_knnlrp.networks import NeuralizedKNN, NeuralizedSVM, rows_per_block

FIELDS = ("output", "mean_pos", "mean_neg", "sqdiff_pos", "sqdiff_neg")


@pytest.fixture(scope="module")
def wine():
    t = bundled("wine")
    return standard_split(t.X, t.y)


def _run(monkeypatch, rows, fn):
    """fn() with blocks of ``rows`` rows (None: one block for every row)."""
    with monkeypatch.context() as mp:
        if rows is None:
            mp.setattr(networks, "BLOCK_ROWS", 10**9)
        else:
            mp.setattr(networks, "BLOCK_ROWS", rows)
            real = networks.squared_distances

            def guarded(X, P):  # no (rows × points) matrix larger than one block
                assert len(X) <= rows
                return real(X, P)

            mp.setattr(networks, "squared_distances", guarded)
        return fn()


def _rel(a, b):
    return np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(b)))


@pytest.mark.parametrize("dataset", ["cancer", "digits49"])
def test_knn_explain_blocked_is_bit_identical(dataset, request, monkeypatch):
    Xtr, Xte, ytr, _ = request.getfixturevalue(dataset)
    X = np.vstack([Xte, Xtr[:150]])
    for k in (1, 5, 9):
        knn = KNeighborsClassifier(k).fit(Xtr, ytr)
        for kappa in sorted({0, (k - 1) // 2}):
            for rule, eta in (("gi", None), ("midpoint", None), ("hybrid", None), ("hybrid", 0.3)):
                def go():
                    return explain(knn, X, rule=rule, eta=eta, kappa=kappa)
                one, blocked = _run(monkeypatch, None, go), _run(monkeypatch, 7, go)
                np.testing.assert_array_equal(blocked.values, one.values)
                np.testing.assert_array_equal(blocked.output, one.output)


@pytest.mark.parametrize("dataset", ["cancer", "digits49"])
def test_svm_explain_blocked_matches_single_block(dataset, request, monkeypatch):
    Xtr, Xte, ytr, _ = request.getfixturevalue(dataset)
    X = np.vstack([Xte, Xtr[:150]])
    for gamma in (0.003, 0.03, 0.3):
        svc = SVC(C=1.0, gamma=gamma).fit(Xtr, ytr)
        for rule, eta, beta in (("gi", None, None), ("midpoint", None, None), ("hybrid", None, None),
                                ("hybrid", 0.5, 0.1)):
            def go():
                return explain(svc, X, rule=rule, eta=eta, beta=beta)
            one, blocked = _run(monkeypatch, None, go), _run(monkeypatch, 7, go)
            # g comes from per-row log-sum-exps only: bit-identical
            np.testing.assert_array_equal(blocked.output, one.output)
            assert _rel(blocked.values, one.values) <= 1e-12


def test_svm_network_methods_blocked(cancer, monkeypatch):
    """moments, forward, decision_function, pooled_offsets, gradient and the identity residuals of
    ``check``, blocked vs one block."""
    Xtr, Xte, ytr, _ = cancer
    svc = SVC(C=1.0, gamma=0.03).fit(Xtr, ytr)
    dc, sv = svc.dual_coef_[0], svc.support_vectors_
    for b in (svc.intercept_[0], -abs(svc.intercept_[0]) - 0.5, abs(svc.intercept_[0]) + 0.5):
        net = NeuralizedSVM(sv[dc > 0], sv[dc < 0], dc[dc > 0], -dc[dc < 0], 0.03, b)

        def go():
            m = net.moments(Xte)
            return (m, net.forward(Xte), net.decision_function(Xte), net.pooled_offsets(Xte), net.gradient(Xte),
                    svm_identity_residual(net, Xte), svm_midpoint_residual(net, Xte))
        one, blocked = _run(monkeypatch, None, go), _run(monkeypatch, 7, go)
        np.testing.assert_array_equal(blocked[0].output, one[0].output)
        np.testing.assert_array_equal(blocked[1], one[1])
        np.testing.assert_array_equal(blocked[1], one[0].output)  # forward == moments().output
        for f in FIELDS[1:]:
            assert _rel(getattr(blocked[0], f), getattr(one[0], f)) <= 1e-12
        for a, c in zip(blocked[2:5], one[2:5]):
            assert _rel(a, c) <= 1e-12
        for res in blocked[5:] + one[5:]:
            assert res.max() <= 1e-10
        shift = b - svc.intercept_[0]
        np.testing.assert_allclose(one[2], svc.decision_function(Xte) + shift, rtol=1e-10, atol=1e-10)


def test_multiclass_explain_blocked(wine, monkeypatch):
    Xtr, Xte, ytr, _ = wine
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    svc = SVC(C=1.0, gamma=0.1).fit(Xtr, ytr)
    for mc in ("min", "softmin"):
        one = _run(monkeypatch, None, lambda: explain(knn, Xte, multiclass=mc))
        blocked = _run(monkeypatch, 3, lambda: explain(knn, Xte, multiclass=mc))
        np.testing.assert_array_equal(blocked.values, one.values)
        np.testing.assert_array_equal(blocked.output, one.output)
        one = _run(monkeypatch, None, lambda: explain(svc, Xte, multiclass=mc))
        blocked = _run(monkeypatch, 3, lambda: explain(svc, Xte, multiclass=mc))
        assert _rel(blocked.values, one.values) <= 1e-12
        assert _rel(blocked.output, one.output) <= 1e-12


def _tie_counts(net, X):
    """Rows whose rank window is bounded by exactly equal distances (so the tie rule matters)."""
    lo, hi = net.k_decisive - net.kappa, net.k_decisive + net.kappa  # ranks lo … hi (1-based)
    n = 0
    for pts in (net.points_pos, net.points_neg):
        D = np.sort(networks.squared_distances(X, pts), axis=1)
        n += int(np.sum(D[:, hi - 1] == D[:, hi]))
        if lo > 1:
            n += int(np.sum(D[:, lo - 2] == D[:, lo - 1]))
    return n


def test_knn_exact_distance_ties_blocked_equals_unblocked(monkeypatch):
    """Raw digit pixels (integer distances) plus duplicated training points: many exact ties at the
    window's boundaries, resolved the same way whether a row is alone, in a block of 7, or with all rows."""
    t = bundled("digits49")
    X, y = np.asarray(t.X, dtype=np.float64), np.asarray(t.y)
    rng = np.random.default_rng(0)
    Xtr, ytr = X[:301], y[:301]
    dup = rng.choice(len(Xtr), 60, replace=False)
    Xtr, ytr = np.vstack([Xtr, Xtr[dup]]), np.concatenate([ytr, ytr[dup]])
    # points moved by ±1 on one pixel, so distinct points lie at exactly equal distances
    shift = np.zeros_like(Xtr[:40])
    shift[np.arange(40), rng.integers(0, X.shape[1], 40)] = rng.choice([-1.0, 1.0], 40)
    Xtr, ytr = np.vstack([Xtr, Xtr[:40] + shift]), np.concatenate([ytr, ytr[:40]])
    Xq = np.vstack([X[301:500], Xtr[:50]])  # training rows too: zero distances tie with their duplicates
    pos, neg = Xtr[ytr == ytr.max()], Xtr[ytr == ytr.min()]
    for k, kappa in ((1, 0), (3, 1), (5, 0), (5, 2), (9, 4)):
        net = NeuralizedKNN(pos, neg, k, kappa)
        assert _tie_counts(net, Xq) > 0
        one = _run(monkeypatch, None, lambda: net.moments(Xq))
        for rows in (1, 7):
            blocked = _run(monkeypatch, rows, lambda: net.moments(Xq))
            for f in FIELDS:
                np.testing.assert_array_equal(getattr(blocked, f), getattr(one, f))
        # and row by row through a permuted batch: a row's neighbours do not depend on the others
        perm = rng.permutation(len(Xq))
        shuffled = _run(monkeypatch, None, lambda: net.moments(Xq[perm]))
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(shuffled, f), getattr(one, f)[perm])
        # conservation at η = 1 holds on tied rows as well
        R = one.sqdiff_neg - one.sqdiff_pos
        assert np.max(np.abs(R.sum(axis=1) - one.output) / np.maximum(1.0, np.abs(one.output))) <= 1e-9


def test_rows_per_block_from_budget(monkeypatch):
    monkeypatch.setattr(networks, "BLOCK_ROWS", None)
    monkeypatch.setattr(networks, "BLOCK_BYTES", 256 * 2**20)
    assert rows_per_block(20_000, 2) == 256 * 2**20 // (20_000 * 16)
    assert rows_per_block(10**12, 2) == 1  # never zero rows
    monkeypatch.setattr(networks, "BLOCK_ROWS", 7)
    assert rows_per_block(20_000, 2) == 7


def test_budget_bounds_the_distance_blocks(cancer, monkeypatch):
    """With the default path (no BLOCK_ROWS) a small budget yields small blocks and the same result."""
    Xtr, Xte, ytr, _ = cancer
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    one = _run(monkeypatch, None, lambda: explain(knn, Xte))
    n_pts = max(np.sum(ytr == 0), np.sum(ytr == 1))
    seen = []
    real = networks.squared_distances
    with monkeypatch.context() as mp:
        mp.setattr(networks, "BLOCK_ROWS", None)
        mp.setattr(networks, "BLOCK_BYTES", 10 * n_pts * 16)  # 10 rows of distances + indices
        mp.setattr(networks, "squared_distances", lambda X, P: (seen.append(len(X)), real(X, P))[1])
        small = explain(knn, Xte)
    assert max(seen) == 10 and len(seen) == 2 * -(-len(Xte) // 10)
    np.testing.assert_array_equal(small.values, one.values)
    np.testing.assert_array_equal(small.output, one.output)
