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
"""

from __future__ import annotations

import numpy as np

_U32 = 2.0 ** -24  # unit roundoff of float32


def _exact_rows(X: np.ndarray, sq: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    d = sq[rows, None] - 2.0 * (X[rows] @ X.T) + sq[None, :]
    return np.argsort(d, axis=1, kind="stable")[:, :n]


def _order_runs(X: np.ndarray, sq: np.ndarray, q: np.ndarray, j: np.ndarray, run: np.ndarray) -> np.ndarray:
    """Re-order the neighbours ``j`` of queries ``q`` inside each run (``run`` ids, contiguous, ascending) by
    exact float64 distance, equal distances by index. Most runs are pairs: a vectorised compare-and-swap;
    longer runs are sorted."""
    d64 = sq[q] - 2.0 * np.einsum("ij,ij->i", X[q], X[j]) + sq[j]
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


def nearest_neighbours(X: np.ndarray, n_neighbors: int, block: int = 64) -> np.ndarray:
    """Indices (N, n_neighbors) of each row's nearest rows (itself included), nearest first."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    N, D = X.shape
    if not np.all(np.isfinite(X)):
        raise ValueError("nearest_neighbours needs finite features")
    n = int(min(n_neighbors, N))
    sq = np.einsum("ij,ij->i", X, X)
    c = n + 16  # spare candidates keep the certificate from failing on ordinary data
    if c >= N:
        return np.concatenate([_exact_rows(X, sq, np.arange(s, min(s + block, N)), n) for s in range(0, N, block)])
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
        if L:
            M = M_buf[:b]
            np.max(S[:, : L * G].reshape(b, L, G), axis=1, out=M)
            if rest:
                np.maximum(M[:, :rest], S[:, L * G:], out=M[:, :rest])
            M.partition(G - c, axis=1)
            tau = M[:, G - c].copy()
        else:
            tau = np.partition(S, N - c, axis=1)[:, N - c]
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
        bad = np.flatnonzero(~(score[first + n - 1].astype(np.float64) - sep[s:e] >= tau))
        if len(bad):
            res[bad] = _exact_rows(X, sq, s + bad, n)
        out[s:e] = res
    return out
