"""Same-slide exclusion before the kNN selection (``nearest_other_group_neighbours``): the neighbour lists,
the truncation length m and every RI summary value equal those of the previous algorithm (query
``k + max tiles per slide`` neighbours of all slides with ``nearest_neighbours``, drop the own slide, truncate
to the shortest row), on sets with slides much larger than k, exact duplicate rows (ties, within and across
slides) and both metrics (L2-normalised = cosine ranking, and raw Euclidean with unequal norms)."""

import numpy as np
import pytest
from sklearn.preprocessing import normalize

import tub_pathorob.robustness_index as ri
from tub_pathorob.knn import nearest_neighbours, nearest_other_group_neighbours
from tub_pathorob.metadata import Metadata


def previous_other_slide_neighbours(X, slide, k_required):
    """The previous ``nearest_other_slide_neighbours`` (reference): full query, then exclusion + truncation."""
    n = len(X)
    n_nb = min(k_required + int(np.bincount(slide).max()), n)
    idx = nearest_neighbours(X, n_nb)
    keep = slide[idx] != slide[:, None]
    count = np.count_nonzero(keep, axis=1)
    m = int(count.min())
    out = np.stack([row[kp][:m] for row, kp in zip(idx, keep)]) if m else np.empty((n, 0), dtype=idx.dtype)
    return out, n_nb


def brute_other_slide_neighbours(X, slide, k_required):
    """Plain float64 reference: stable argsort of the squared-distance expansion, ties by index."""
    X = np.asarray(X, dtype=np.float64)
    sq = np.einsum("ij,ij->i", X, X)
    d = sq[:, None] - 2.0 * (X @ X.T) + sq[None, :]
    n_nb = min(k_required + int(np.bincount(slide).max()), len(X))
    order = np.argsort(d, axis=1, kind="stable")[:, :n_nb]
    keep = slide[order] != slide[:, None]
    m = int(np.count_nonzero(keep, axis=1).min())
    return np.stack([row[kp][:m] for row, kp in zip(order, keep)]), m


def large_slide_set(seed, sizes=(400, 400, 400, 30, 12, 5, 3), D=24, slide_scale=0.6, metric="cosine", dups=80,
                    near=True):
    rng = np.random.default_rng(seed)
    slide = np.repeat(np.arange(len(sizes)), sizes)
    N = len(slide)
    X = rng.standard_normal((len(sizes), D))[slide] * slide_scale + rng.standard_normal((N, D))
    src, dst = rng.choice(N, dups, replace=False), rng.choice(N, dups, replace=False)
    X[dst] = X[src]  # exact duplicates (within and across slides): exact distance ties
    if near:  # near-duplicates: float32 cannot order them, float64 decides (or rounds them to a tie)
        src, dst = rng.choice(N, dups, replace=False), rng.choice(N, dups, replace=False)
        X[dst] = X[src] + 1e-9 * rng.standard_normal((dups, D))
    perm = rng.permutation(N)  # slides interleaved, as after the protocol's shuffle
    X, slide = X[perm], slide[perm]
    if metric == "cosine":
        X = normalize(X)
    else:
        X = X * rng.uniform(0.5, 2.0, (N, 1))  # unequal norms: the float32 pass subtracts ‖y‖²/2
    return X, slide


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 11, 61])
@pytest.mark.parametrize("sample", [32, 0])  # 0: no probe rows, R grows by doubling
@pytest.mark.parametrize("near", [True, False])
def test_other_slide_neighbours_equal_previous(metric, k, sample, near):
    X, slide = large_slide_set(k, metric=metric, near=near)
    want, n_nb = previous_other_slide_neighbours(X, slide, k)
    got, m = nearest_other_group_neighbours(X, slide, n_nb, sample=sample)
    assert m == want.shape[1] and m >= k
    assert got.dtype == want.dtype and np.array_equal(got, want)
    if not near:
        # also the plain float64 order (distances within float64 rounding of each other, as the 1e-9
        # near-duplicates of normalised rows, may be ordered differently by a BLAS product: not compared)
        ref, m_ref = brute_other_slide_neighbours(X, slide, k)
        assert m_ref == m and np.array_equal(got, ref)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_clustered_slides_m_equals_k(metric):
    """Tight slides: every tile's own slide comes first, m = k (the case the exclusion makes cheap)."""
    X, slide = large_slide_set(7, slide_scale=4.0, metric=metric, dups=0)
    want, n_nb = previous_other_slide_neighbours(X, slide, 11)
    got, m = nearest_other_group_neighbours(X, slide, n_nb)
    assert m == want.shape[1] == 11
    assert np.array_equal(got, want)


@pytest.mark.parametrize("sizes,k", [((300, 40, 20), 11), ((100, 90, 80), 200), ((60, 60), 5)])
def test_small_sets_capped_and_exact_paths(sizes, k):
    """k + largest slide >= N (every row keeps all other-slide rows) and too few other-slide rows for the
    float32 candidates (exact float64 rows)."""
    X, slide = large_slide_set(3, sizes=sizes, D=8)
    want, n_nb = previous_other_slide_neighbours(X, slide, k)
    got, m = nearest_other_group_neighbours(X, slide, n_nb)
    assert m == want.shape[1]
    assert np.array_equal(got, want)


def test_single_slide_has_no_neighbours():
    X, slide = large_slide_set(1, sizes=(50,), D=8, dups=10)
    got, m = nearest_other_group_neighbours(X, slide, 61)
    assert m == 0 and got.shape == (50, 0)


@pytest.mark.parametrize("sample", [0, 32])
def test_n_total_below_the_largest_group(sample):
    """A group larger than n_total + 16 leaves some rows no other-group neighbour among their n_total
    nearest: m = 0 ... or small, the same with and without probe rows (sample=0 crashed)."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 4))
    groups = np.r_[np.zeros(150, int), np.ones(50, int)]
    got, m = nearest_other_group_neighbours(X, groups, 100, sample=sample)
    ref, m_ref = nearest_other_group_neighbours(X, groups, 100, sample=200)
    assert m == m_ref and np.array_equal(got, ref)


def _meta(slide, rng):
    n_sl = int(slide.max()) + 1
    bio = rng.integers(0, 2, n_sl)
    cen = np.arange(n_sl) % 3
    return Metadata({
        "subset": np.array(["ID"] * len(slide)),
        "slide_id": np.array([f"s{s}" for s in slide]),
        "patch_id": np.array([f"p{i}" for i in range(len(slide))]),
        "biological_class": np.array([f"b{bio[s]}" for s in slide]),
        "medical_center": np.array([f"c{cen[s]}" for s in slide]),
    })


@pytest.mark.parametrize("k,k_search", [(11, False), (5, False), (None, True)])
def test_robustness_index_summary_identical(monkeypatch, k, k_search):
    """Every summary value, curve and neighbour list of ``robustness_index`` is bit-identical to the previous
    algorithm's (m, and so normalized_confounder_insensitivity, included)."""
    rng = np.random.default_rng(11)
    sizes = (400, 400, 400, 60, 60, 40, 30, 12, 5, 3)
    X, slide = large_slide_set(5, sizes=sizes, D=32, slide_scale=0.8, metric="euclidean")
    meta = _meta(slide, rng)
    kw = dict(k=k, k_search=k_search, max_k=61 if k_search else None, auc=False, bootstrap=20)
    new = ri.robustness_index(X, meta, **kw)
    monkeypatch.setattr(ri, "nearest_other_slide_neighbours", previous_other_slide_neighbours)
    old = ri.robustness_index(X, meta, **kw)
    assert new.summary == old.summary
    assert new.curves.keys() == old.curves.keys()
    for key in old.curves:
        assert np.array_equal(new.curves[key], old.curves[key], equal_nan=True)
    assert np.array_equal(new.bal_acc, old.bal_acc)
    (_, _, ns_new), = new.sets
    (_, _, ns_old), = old.sets
    assert ns_new.n_neighbors_queried == ns_old.n_neighbors_queried
    assert np.array_equal(ns_new.neighbours, ns_old.neighbours)


def pairwise_other_slide_neighbours(X, slide, n_nb):
    """The tie rule itself: per query, float64 distances sq_i − 2 x_i·x_j + sq_j with the dot product of each
    pair computed alone (as the kNN's near-tie repair does), stable argsort (equal distances by index)."""
    X = np.asarray(X, dtype=np.float64)
    sq = np.einsum("ij,ij->i", X, X)
    N = len(X)
    rows = []
    for i in range(N):
        d = sq[i] - 2.0 * np.einsum("ij,ij->i", X[np.full(N, i)], X) + sq
        order = np.argsort(d, kind="stable")[:n_nb]
        rows.append(order[slide[order] != slide[i]])
    m = min(len(r) for r in rows)
    return np.stack([r[:m] for r in rows]), m


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_heavy_duplicates_certificate_fallback(monkeypatch, metric):
    """Rows drawn from 40 distinct vectors (each repeated ~31 times, across slides): tied runs longer than
    the spare candidates make the float32 certificate fail, and those queries take the float64 rows. The
    result is the exact tie rule (equal distances by index). The previous code's float64 rows could put a
    tied duplicate out of index order (a BLAS product of one row rounds some columns differently), so
    against it only m is compared here."""
    import tub_pathorob.knn as knn

    rng = np.random.default_rng(4)
    sizes = (400, 400, 400, 30, 12, 5, 3)
    slide = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    pool = rng.standard_normal((40, 12))
    pool = normalize(pool) if metric == "cosine" else pool * rng.uniform(0.5, 2.0, (40, 1))
    X = pool[rng.integers(0, 40, len(slide))]
    calls = []
    orig = knn._exact_rows_other

    def counted(X, sq, rows, *a):
        calls.append(len(rows))
        return orig(X, sq, rows, *a)

    monkeypatch.setattr(knn, "_exact_rows_other", counted)
    for k in (1, 11):
        want, n_nb = previous_other_slide_neighbours(X, slide, k)
        got, m = nearest_other_group_neighbours(X, slide, n_nb)
        ref, m_ref = pairwise_other_slide_neighbours(X, slide, n_nb)
        assert m == m_ref == want.shape[1]
        assert np.array_equal(got, ref)
    assert len(calls) > 2  # the fallback ran inside the pass, not only for the probe rows
