"""Exact Euclidean k-nearest neighbours: a certified float32 pass, float64 only where float32 cannot decide.

The n nearest rows of x_i minimise ‖y‖²/2 − x·y, i.e. maximise the score x·y − ‖y‖²/2. Per block of
queries:

1. a float32 matrix product gives every score (the constant ‖y‖²/2 is dropped when all rows have the
   same norm up to rounding, as after L2 normalisation; its spread then enters the error bound);
2. a threshold τ_i that at least c = n + 16 scores reach, without a full selection: split the columns
   into G interleaved groups, take each group's maximum, and let τ_i be the c-th largest maximum
   (c groups reach τ_i, so at least c points do; with ~10 points per group about 1.08·c do);
3. the points with score ≥ τ_i are the candidates; they are sorted by float32 score;
4. a rigorous float32 rounding bound e_i (dot-product error γ_D‖x‖‖y‖ plus the rounding of X to
   float32 and of the subtraction) certifies the result: the n-th candidate's score − 2e_i ≥ τ_i
   means no other point can be among the n nearest, and two sorted candidates whose scores differ
   by more than 2e_i are in exact order. Only runs of consecutive candidates closer than that get
   float64 distances ‖x‖² − 2x·y + ‖y‖² (the expansion scikit-learn's brute-force search uses) and
   are re-ordered by them, equal distances by index (on L2-normalised 64-D features about 20 of the
   first 311 neighbours of a query are in such runs, nearly all pairs).

Queries that fail the certificate (duplicates, degenerate data) are recomputed in float64 over all
points. The result is the exact float64 neighbour order (ties by index), the order scikit-learn's
``NearestNeighbors(algorithm="brute")`` returns — which reaches it with a per-element heap and float64
products, several times slower for the n of PathoROB (k + the largest slide). Per 20,400 × 64 set
and n = 311 (one thread) about half the time is the float32 product; no full per-row selection
(``argpartition``) or float64 product over all candidates is needed.

``nearest_other_group_neighbours`` (PathoROB's same-slide exclusion) runs the same pass with each query's
own group set to −inf in the float32 block before the selection, so it needs only the m other-group
neighbours that are kept instead of k + the largest group; m (the shortest row after exclusion) is counted
exactly from the own group's scores, float64 distances deciding near ties, as in the runs.
"""

from __future__ import annotations

import numpy as np

_U32 = 2.0 ** -24  # unit roundoff of float32


def _exact_rows(X: np.ndarray, sq: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    d = sq[rows, None] - 2.0 * (X[rows] @ X.T) + sq[None, :]
    return np.argsort(d, axis=1, kind="stable")[:, :n]


def _d64(X: np.ndarray, sq: np.ndarray, q: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float64 distances of the pairs (q, j), the expansion that decides near-tied runs."""
    return sq[q] - 2.0 * np.einsum("ij,ij->i", X[q], X[j]) + sq[j]


def _order_runs(X: np.ndarray, sq: np.ndarray, q: np.ndarray, j: np.ndarray, run: np.ndarray) -> np.ndarray:
    """Re-order the neighbours ``j`` of queries ``q`` inside each run (``run`` ids, contiguous, ascending) by
    exact float64 distance, equal distances by index. Most runs are pairs: a vectorised compare-and-swap;
    longer runs are sorted."""
    d64 = _d64(X, sq, q, j)
    first = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])
    size = np.diff(np.r_[first, len(run)])
    out = j.copy()
    a = first[size == 2]
    b = a + 1
    swap = (d64[a] > d64[b]) | ((d64[a] == d64[b]) & (j[a] > j[b]))
    out[a[swap]], out[b[swap]] = j[b[swap]], j[a[swap]]
    long = np.flatnonzero(np.repeat(size > 2, size))
    if len(long):
        out[long] = j[long][np.lexsort((j[long], d64[long], run[long]))]
    return out


def _groups(N: int, c: int) -> tuple[int, int]:
    """G interleaved column groups of L (or L + 1) points for the threshold of step 2; L = 0: no grouping."""
    G = 1 << int(np.ceil(np.log2(4 * c)))
    L = N // G
    return G, (L if L >= 2 else 0)


def _prepare(X: np.ndarray):
    X = np.ascontiguousarray(X, dtype=np.float64)
    N, D = X.shape
    if not np.all(np.isfinite(X)):
        raise ValueError("nearest_neighbours needs finite features")
    sq = np.einsum("ij,ij->i", X, X)
    return X, sq


def nearest_neighbours(X: np.ndarray, n_neighbors: int, block: int = 64) -> np.ndarray:
    """Indices (N, n_neighbors) of each row's nearest rows (itself included), nearest first."""
    X, sq = _prepare(X)
    N = len(X)
    n = int(min(n_neighbors, N))
    if n + 16 >= N:
        return np.concatenate([_exact_rows(X, sq, np.arange(s, min(s + block, N)), n) for s in range(0, N, block)])
    return _pass(X, sq, n, block)[0]


def _exact_rows_other(X, sq, rows, n, groups, n_total, repair=True):
    """``_exact_rows`` among the rows of other groups, and the number of other-group rows among each row's
    ``n_total`` nearest rows (all groups), capped at n. Distances of one BLAS product can differ in the last
    bits between columns (edge columns, a product of one row): with ``repair``, sorted distances within
    float64 rounding of each other are re-ordered by the pair distances of ``_order_runs``, equal ones by
    index, so these rows follow the same order as the certified ones."""
    d = sq[rows, None] - 2.0 * (X[rows] @ X.T) + sq[None, :]
    N = d.shape[1]
    g = groups[rows, None]
    norms = np.sqrt(sq)
    slack = 4e-12 * (norms[rows] + norms.max()) ** 2  # > twice any float64 distance error (as ``sep``)
    order = np.argsort(d, axis=1, kind="stable")
    P = min(N, max(n_total, n + int(np.bincount(groups).max())))  # holds the first n other-group rows
    if repair:
        ds = np.take_along_axis(d, order, axis=1)
        linked = ds[:, 1:] - ds[:, :-1] <= slack[:, None]  # (b, N - 1)
        while P < N and linked[:, P - 1].any():  # a run crosses the prefix: extend it
            P = min(N, P + 64)
        lk = linked[:, : P - 1]
    if repair and lk.any():
        run = np.zeros((len(rows), P), dtype=np.int64)
        run[:, 1:] = np.cumsum(~lk, axis=1)
        run += (np.arange(len(rows)) * (P + 1))[:, None]  # ids ascending across rows
        member = np.zeros((len(rows), P), dtype=bool)
        member[:, 1:] |= lk
        member[:, :-1] |= lk
        r, c = np.nonzero(member)
        order[r, c] = _order_runs(X, sq, rows[r], order[r, c], run[r, c])
    order = order[:, :P]
    count = np.full(len(rows), n, dtype=np.int64)
    if n_total:
        count = np.minimum(np.count_nonzero(groups[order[:, :n_total]] != g, axis=1), n)
    keep = groups[order] != g
    pos = np.argsort(~keep, axis=1, kind="stable")[:, :n]  # the first n other-group entries, in order
    return np.take_along_axis(order, pos, axis=1), count


def _count_other(X, sq, i, o, so, sw, wcols, sep_i, n_total):
    """How many of row i's other-group neighbours ``o`` (exact order, float32 scores ``so``) are among its
    ``n_total`` nearest rows of all groups, given its own group's columns ``wcols`` and their float32 scores
    ``sw``: the r-th other-group neighbour is there iff r + #(own-group rows before it) <= n_total. Scores
    further apart than ``sep_i`` are in exact order; closer pairs are compared by float64 distance, equal
    distances by index (the order of ``nearest_neighbours``)."""
    order = np.argsort(sw, kind="stable")
    sw, wcols = sw[order], wcols[order]
    t = len(sw)
    lo = np.searchsorted(sw, so - sep_i, side="left")    # own-group scores >= so - sep: possibly before
    hi = np.searchsorted(sw, so + sep_i, side="right")   # own-group scores > so + sep: surely before
    r = np.arange(1, len(o) + 1)
    sure_in = r + (t - lo) <= n_total
    sure_out = r + (t - hi) > n_total
    inside = sure_in.copy()
    amb = np.flatnonzero(~sure_in & ~sure_out)
    if len(amb):
        a, b = int(lo[amb].min()), int(hi[amb].max())
        dw = _d64(X, sq, np.full(b - a, i), wcols[a:b])
        do = _d64(X, sq, np.full(len(amb), i), o[amb])
        for p, rr in enumerate(amb):
            w = slice(lo[rr] - a, hi[rr] - a)
            before = (dw[w] < do[p]) | ((dw[w] == do[p]) & (wcols[a:b][w] < o[rr]))
            inside[rr] = rr + 1 + (t - hi[rr]) + int(np.count_nonzero(before)) <= n_total
    return int(np.count_nonzero(inside))


def _pass(X, sq, n, block, groups=None, n_total=0, need=None):
    """The certified float32 pass (module docstring) for n neighbours per row. With ``groups`` every row's own
    group is excluded (its scores are set to -inf before the selection), and for the rows in ``need`` the
    number of other-group rows among the ``n_total`` nearest rows of all groups is counted (capped at n;
    other rows get n)."""
    N, D = X.shape
    c = n + 16  # spare candidates keep the certificate from failing on ordinary data
    norms = np.sqrt(sq)
    ymax = norms.max()
    half = 0.5 * sq
    # |float32 score − exact score| <= err_i: dot-product error (gamma_D ‖x‖‖y‖, with the float32 rounding
    # of X folded into gamma) plus the rounding of ‖y‖²/2 and of the subtraction.
    gamma = (D + 6) * _U32 / (1 - (D + 6) * _U32)
    err = gamma * norms * ymax + 2 * _U32 * (0.5 * ymax ** 2 + norms * ymax)
    spread = float(half.max() - half.min())
    shift = spread > float(err.min())
    if not shift:  # equal norms up to rounding: rank by x·y alone, the spread of ‖y‖²/2 is part of the error
        err = err + spread
    # two scores further apart than sep are in exact order (float64 rounding of the distances included)
    sep = 2.0 * err * (1 + 1e-6) + 1e-12 * (norms + ymax) ** 2
    X32 = X.astype(np.float32)
    half32 = half.astype(np.float32)
    G, L = _groups(N, c)
    out = np.empty((N, n), dtype=np.int32 if N < 2 ** 31 else np.int64)
    count = np.full(N, n, dtype=np.int64)
    if groups is not None:
        members = np.argsort(groups, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(groups))]
    S_buf = np.empty((min(block, N), N), dtype=np.float32)  # reused: no page faults for fresh 10 MB blocks
    mask_buf = np.empty((min(block, N), N), dtype=bool)
    M_buf = np.empty((min(block, N), G), dtype=np.float32)
    rest = N - L * G
    for s in range(0, N, block):
        e = min(s + block, N)
        b = e - s
        S, mask = S_buf[:b], mask_buf[:b]
        np.matmul(X32[s:e], X32.T, out=S)
        if shift:
            S -= half32
        own = []
        if groups is not None:
            gb = groups[s:e]
            for g in np.unique(gb):
                loc = np.flatnonzero(gb == g)
                wcols = members[bounds[g]:bounds[g + 1]]
                cnt = loc[need[s + loc]]
                if len(cnt):
                    own.append((cnt, wcols, S[np.ix_(cnt, wcols)].astype(np.float64)))
                S[np.ix_(loc, wcols)] = -np.inf
        if L:
            M = M_buf[:b]
            np.max(S[:, : L * G].reshape(b, L, G), axis=1, out=M)
            if rest:
                np.maximum(M[:, :rest], S[:, L * G:], out=M[:, :rest])
            M.partition(G - c, axis=1)
            tau = M[:, G - c].copy()
        else:
            tau = np.partition(S, N - c, axis=1)[:, N - c]
        for r in np.flatnonzero(np.isneginf(tau)):  # fewer than c groups outside the own group: plain selection
            tau[r] = np.partition(S[r], N - c)[N - c]
        np.greater_equal(S, tau[:, None], out=mask)
        flat = np.flatnonzero(mask)  # candidates, row-major; at least c per row
        rows = flat // N
        score = S.ravel()[flat]
        # each row's candidates by descending score (= ascending distance): a global sort by score, then a
        # stable sort by row (a radix sort for 16-bit keys)
        order = np.argsort(-score)
        order = order[np.argsort(rows[order].astype(np.int16 if b <= 1 << 15 else np.int64), kind="stable")]
        rows, score = rows[order], score[order]
        cols = flat[order] - rows * N
        first = np.searchsorted(rows, np.arange(b))
        sep_r = sep[s + rows]
        # runs of candidates of one row whose scores float32 cannot order: exact float64 distances decide
        linked = (rows[1:] == rows[:-1]) & (score[:-1] - score[1:] <= sep_r[:-1])
        if linked.any():
            run = np.zeros(len(rows), dtype=np.int64)
            np.cumsum(~linked, out=run[1:])
            member = np.zeros(len(rows), dtype=bool)
            member[1:] |= linked
            member[:-1] |= linked
            member &= run <= run[first + n - 1][rows]  # only runs that reach into the first n places
            p = np.flatnonzero(member)
            if len(p):
                cols[p] = _order_runs(X, sq, s + rows[p], cols[p], run[p])
        res = cols[first[:, None] + np.arange(n)]
        # certificate: the n-th candidate beats every non-candidate (score < tau) by more than the error
        ok = score[first + n - 1].astype(np.float64) - sep[s:e] >= tau
        for cnt, wcols, sw in own:
            for li, sw_i in zip(cnt, sw):
                if ok[li]:
                    o = res[li]
                    count[s + li] = _count_other(X, sq, s + li, o, S[li, o].astype(np.float64), sw_i, wcols,
                                                 sep[s + li], n_total)
        bad = np.flatnonzero(~ok)
        if len(bad):
            if groups is None:
                res[bad] = _exact_rows(X, sq, s + bad, n)
            else:
                res[bad], cb = _exact_rows_other(X, sq, s + bad, n, groups, n_total)
                count[s + bad] = np.where(need[s + bad], cb, n)
        out[s:e] = res
    return out, count


def nearest_other_group_neighbours(X: np.ndarray, groups: np.ndarray, n_total: int, block: int = 64,
                                   sample: int = 32) -> tuple[np.ndarray, int]:
    """Each row's nearest rows of other groups, nearest first, truncated to m columns, and m: the smallest
    number, over rows, of other-group rows among the row's ``n_total`` nearest rows of all groups (itself
    included). Equal to ``nearest_neighbours(X, n_total)`` with every row's own group dropped and all rows
    truncated to the shortest (PathoROB's same-slide exclusion), but the own group is excluded before the
    selection, so the cost grows with m, not with the largest group.

    m is found exactly: a row of a group of t rows keeps at least n_total − t, so a pass for R neighbours
    counts (``_count_other``) only the rows with n_total − t < R; R starts just above the smallest count of a
    few rows of the largest groups (exact float64 rows) and doubles while every count reaches R."""
    X, sq = _prepare(X)
    N = len(X)
    groups = np.unique(np.asarray(groups), return_inverse=True)[1].astype(np.int64).ravel()
    size = np.bincount(groups)
    n_total = int(min(n_total, N))
    rmax = min(n_total, N - int(size.max()))
    itype = np.int32 if N < 2 ** 31 else np.int64
    if rmax <= 0:
        return np.empty((N, 0), dtype=itype), 0
    low = n_total - size[groups]  # each row keeps at least this many
    if n_total + 16 >= N:  # as ``nearest_neighbours``: float64 rows for all queries, the same products
        parts = [_exact_rows_other(X, sq, np.arange(s, min(s + block, N)), rmax, groups, n_total, repair=False)
                 for s in range(0, N, block)]
        m = int(min(p[1].min() for p in parts))
        return np.concatenate([p[0][:, :m] for p in parts]), m  # int64, as there
    if sample < 1:  # no probe rows (tests): start just above the lower bound
        R = max(1, min(rmax, int(low.min()) + 16))
    else:
        probe = np.flatnonzero(low == low.min())
        probe = probe[np.linspace(0, len(probe) - 1, min(sample, len(probe))).astype(np.int64)]
        est = int(_exact_rows_other(X, sq, probe, rmax, groups, n_total)[1].min())
        R = min(rmax, est + 1)
    while True:
        if R + 16 > N - int(size.max()):  # too few other-group rows for the float32 candidates: exact rows
            parts = [_exact_rows_other(X, sq, np.arange(s, min(s + block, N)), R, groups, n_total)
                     for s in range(0, N, block)]
            idx, count = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            idx, count = _pass(X, sq, R, block, groups, n_total, low < R)
        m = int(count.min())
        if m < R or R == rmax:
            return np.ascontiguousarray(idx[:, :m], dtype=itype), m
        R = min(rmax, 2 * R)
