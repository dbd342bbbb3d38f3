"""Exact Euclidean k-nearest neighbours by blocked matrix products and a thresholded selection.

Squared distances are expanded as ‖x‖² − 2x·y + ‖y‖² (as scikit-learn's brute-force search does) in
float64, one block of queries at a time. Selection of the c nearest per query avoids a full
``argpartition`` over all N points: a per-query threshold τ is read off a fixed random sample of
columns (a high order statistic of the sample), every point with rank ≤ τ is gathered, and if at
least c points passed, the c nearest are among them *by construction* (the selection is exact; queries
with too few or too many survivors use the full ``argpartition``). The candidates' distances are then
sorted (stable, ties by index). scikit-learn's ``NearestNeighbors`` reaches the same neighbours with a
per-element heap, which costs more for the n of PathoROB (k + the largest slide, i.e. hundreds).
"""

from __future__ import annotations

import numpy as np


def _select(rank: np.ndarray, c: int, sample: np.ndarray | None, q: int, cap: int) -> np.ndarray:
    """Column indices of the c smallest entries of each row of ``rank`` (unordered, exact)."""
    B, N = rank.shape
    out = np.empty((B, c), dtype=np.int64)
    full = np.ones(B, dtype=bool)
    if sample is not None:
        tau = np.partition(rank[:, sample], q - 1, axis=1)[:, q - 1]
        mask = rank <= tau[:, None]
        cnt = mask.sum(1)
        ok = (cnt >= c) & (cnt <= cap)
        rows = np.flatnonzero(ok)
        if len(rows):
            sub = mask if len(rows) == B else mask[rows]
            r, col = np.nonzero(sub)  # row-major: each row's survivors in column order
            counts = cnt[rows]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            pos = np.arange(len(r)) - starts[r]
            vals = np.full((len(rows), int(counts.max())), np.inf)
            cols = np.zeros(vals.shape, dtype=np.int64)
            vals[r, pos] = rank[rows[r], col]
            cols[r, pos] = col
            pick = np.argpartition(vals, c - 1, axis=1)[:, :c]
            out[rows] = np.take_along_axis(cols, pick, axis=1)
            full[rows] = False
    rest = np.flatnonzero(full)
    if len(rest):
        out[rest] = np.argpartition(rank[rest], c - 1, axis=1)[:, :c]
    return out


def nearest_neighbours(X: np.ndarray, n_neighbors: int, block: int = 512, seed: int = 0) -> np.ndarray:
    """Indices (N, n_neighbors) of each row's nearest rows (itself included), nearest first."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    N = X.shape[0]
    n = int(min(n_neighbors, N))
    sq = np.einsum("ij,ij->i", X, X)
    half_sq = 0.5 * sq
    c = min(N, n + 8)  # a few spare candidates absorb rounding differences between the two rankings
    sample, q, cap = None, 0, 0
    s_size = min(N, 2048)
    if c < N and N >= 4 * s_size:
        sample = np.sort(np.random.default_rng(seed).choice(N, s_size, replace=False))
        q = int(np.ceil(1.5 * c * s_size / N)) + 10  # expected survivors ≈ 1.5 c + 10 N / s_size
        cap = max(4 * c, 4096)
    out = np.empty((N, n), dtype=np.int64)
    for s in range(0, N, block):
        e = min(s + block, N)
        g = X[s:e] @ X.T
        if c < N:
            # rank by ‖y‖²/2 − x·y (= (‖x−y‖² − ‖x‖²)/2), then exact distances of the candidates
            rank = np.subtract(half_sq[None, :], g)
            cand = np.sort(_select(rank, c, sample, q, cap), axis=1)
        else:
            cand = np.broadcast_to(np.arange(N), (e - s, N))
        dc = sq[s:e, None] - 2.0 * np.take_along_axis(g, cand, axis=1) + sq[cand]
        order = np.argsort(dc, axis=1, kind="stable")[:, :n]
        out[s:e] = np.take_along_axis(cand, order, axis=1)
    return out
