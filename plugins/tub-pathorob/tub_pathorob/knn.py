"""Exact Euclidean k-nearest neighbours: a float32 ranking pass, certified, then float64 distances.

Per block of queries: (1) a float32 matrix product ranks every point by ‖y‖²/2 − x·y and
``argpartition`` keeps the c = n + 16 best candidates; (2) the candidates' squared distances are
recomputed in float64 as ‖x‖² − 2x·y + ‖y‖² (the expansion scikit-learn's brute-force search uses) and
sorted (stable, ties by index). A rigorous float32 rounding bound certifies, per query, that no point
outside the candidates can be closer than the n-th candidate; queries that fail the check (near-ties
at the candidate boundary, duplicates) are recomputed in float64 over all points. The result is the
exact float64 neighbour order; scikit-learn's ``NearestNeighbors`` reaches the same neighbours with a
per-element heap, which costs more for the n of PathoROB (k + the largest slide, i.e. hundreds).
"""

from __future__ import annotations

import numpy as np

_U32 = 2.0 ** -24  # unit roundoff of float32


def _exact_rows(X: np.ndarray, sq: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    d = sq[rows, None] - 2.0 * (X[rows] @ X.T) + sq[None, :]
    return np.argsort(d, axis=1, kind="stable")[:, :n]


def nearest_neighbours(X: np.ndarray, n_neighbors: int, block: int = 128) -> np.ndarray:
    """Indices (N, n_neighbors) of each row's nearest rows (itself included), nearest first."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    N, D = X.shape
    n = int(min(n_neighbors, N))
    sq = np.einsum("ij,ij->i", X, X)
    c = n + 16  # spare candidates keep the certificate below from failing on ordinary data
    if c >= N:
        return np.concatenate([_exact_rows(X, sq, np.arange(s, min(s + block, N)), n) for s in range(0, N, block)])
    half32 = (0.5 * sq).astype(np.float32)
    X32 = X.astype(np.float32)
    norms = np.sqrt(sq)
    ymax = norms.max()
    # |float32 rank − exact rank| <= err_i: dot-product error (gamma_D ‖x‖‖y‖, with the float32 rounding of
    # X folded into gamma) plus the rounding of ‖y‖²/2 and of the subtraction; doubled for safety below.
    gamma = (D + 6) * _U32 / (1 - (D + 6) * _U32)
    err = gamma * norms * ymax + 2 * _U32 * (0.5 * ymax ** 2 + norms * ymax)
    out = np.empty((N, n), dtype=np.int64)
    for s in range(0, N, block):
        e = min(s + block, N)
        rank = X32[s:e] @ X32.T
        np.subtract(half32[None, :], rank, out=rank)
        part = np.argpartition(rank, c, axis=1)
        cand = np.sort(part[:, :c], axis=1)
        outside = np.take_along_axis(rank, part[:, c:c + 1], axis=1)[:, 0].astype(np.float64)
        dot = np.empty((e - s, c))
        for t in range(0, e - s, 32):  # small gathers stay in cache
            dot[t:t + 32] = np.einsum("qd,qkd->qk", X[s + t:s + t + 32], X[cand[t:t + 32]])
        dc = sq[s:e, None] - 2.0 * dot + sq[cand]
        order = np.argsort(dc, axis=1, kind="stable")[:, :n]
        idx = np.take_along_axis(cand, order, axis=1)
        nth = 0.5 * (np.take_along_axis(dc, order[:, n - 1:n], axis=1)[:, 0] - sq[s:e])
        bad = np.flatnonzero(~(nth < outside - 2.0 * err[s:e]))
        if len(bad):
            idx[bad] = _exact_rows(X, sq, s + bad, n)
        out[s:e] = idx
    return out
