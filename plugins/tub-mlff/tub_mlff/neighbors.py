"""Neighbour lists for molecules and periodic cells (any triclinic cell, any cutoff).

Vectorised: positions are wrapped into the cell, the needed lattice images are generated once
(enough to cover the cutoff across each pair of lattice planes), and all pairs within the cutoff
come from one k-d tree query (scipy's cKDTree, in C). Returns every pair in both directions with
integer cell offsets, the layout SpookyNet expects (R_j + offset @ cell - R_i).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.spatial import cKDTree

from tubcli.device import denormals_flushed


def _inv3(m: np.ndarray) -> np.ndarray:
    """3x3 inverse by cofactors (no LAPACK call: avoids BLAS thread start-up per MD step)."""
    c = np.cross(m[[1, 2, 0]], m[[2, 0, 1]])
    det = float(np.dot(m[0], c[0]))
    if abs(det) < 1e-12:
        raise ValueError("the cell is singular (zero volume)")
    return c.T / det


def close_pairs(points: np.ndarray, cutoff: float) -> np.ndarray:
    """(P, 2) index pairs i < j of ``points`` closer than ``cutoff`` (scipy's k-d tree, built with subnormal
    flushing off: it crashed for a caller who had turned flushing on, see tubcli.device.denormals_flushed)."""
    with denormals_flushed(False):
        return cKDTree(points).query_pairs(cutoff, output_type="ndarray")


def neighbor_list(positions: np.ndarray, cell: np.ndarray | None, pbc, cutoff: float):
    """All pairs (i, j, offset) with |R_j + offset.cell - R_i| < cutoff, i != j or offset != 0.

    Returns idx_i [P], idx_j [P] (int64), offsets [P,3] (int64), distances [P].
    """
    pos = np.asarray(positions, dtype=np.float64)
    n = len(pos)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros((0, 3), dtype=np.int64), np.zeros(0)
    if not pbc.any():
        pairs = close_pairs(pos, cutoff)
        i = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(np.int64)
        j = np.concatenate([pairs[:, 1], pairs[:, 0]]).astype(np.int64)
        d = np.linalg.norm(pos[j] - pos[i], axis=1)
        order = np.lexsort((j, i))
        return i[order], j[order], np.zeros((len(i), 3), dtype=np.int64), d[order]

    # a zero cell vector along an open direction (a sheet with c = 0) gets a unit stand-in: positions
    # are never shifted along it, so it only serves the fractional coordinates
    cell = np.asarray(cell, dtype=np.float64)
    if not (np.linalg.norm(cell, axis=1)[pbc] < 1e-12).any():
        from ase.geometry import complete_cell

        cell = complete_cell(cell)
    inv = _inv3(cell)
    frac = pos @ inv
    shift = np.where(pbc, np.floor(frac), 0.0)
    wrapped = pos - shift @ cell
    shift = shift.astype(np.int64)
    # lattice-plane spacings d_k = 1 / |b_k| (b = rows of inv(cell).T)
    recip = inv.T
    spacing = 1.0 / np.linalg.norm(recip, axis=1)
    nrep = np.where(pbc, np.ceil(cutoff / spacing).astype(np.int64), 0)
    images = np.array(list(itertools.product(*[range(-k, k + 1) for k in nrep])), dtype=np.int64)
    img_pos = (wrapped[None, :, :] + (images @ cell)[:, None, :]).reshape(-1, 3)
    with denormals_flushed(False):  # cKDTree crashes when a caller flushes subnormals (see there)
        coo = cKDTree(wrapped).sparse_distance_matrix(cKDTree(img_pos), cutoff, output_type="ndarray")
    i = coo["i"].astype(np.int64)
    k = coo["j"].astype(np.int64)
    s, j = np.divmod(k, n)
    off = images[s]
    keep = ~((i == j) & np.all(off == 0, axis=1))
    i, j, off = i[keep], j[keep], off[keep]
    off = off - shift[j] + shift[i]  # back to the caller's (unwrapped) positions
    d = np.linalg.norm(pos[j] + off @ cell - pos[i], axis=1)
    order = np.lexsort((j, i))
    return i[order], j[order], off[order], d[order]
