"""Clustering score (CS) of Kömen et al., arXiv 2507.17845 (2025), spec §2.4.

For every pair of classes × pair of centers, k-means on the L2-normalised features of the four
cells; ``cs = ARI(class, clusters) − ARI(center, clusters)``: +1 when clusters follow biology only,
−1 when they follow the center only. K is chosen by the cosine silhouette (K = 2..30, first argmax)
unless fixed (silhouette in closed form, ``cosine_silhouette``); every experiment is repeated with
seeds 1337 + t.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations, product

import numpy as np

from tubcli.errors import TubError

from .metadata import Metadata
from .robustness_index import check_nonzero_rows


@dataclass
class ClusteringResult:
    summary: dict
    aris: list[tuple[str, int, float, float, float]] = field(default_factory=list)  # combination, trial, ari_bio, ari_mc, cs
    silhouettes: list[tuple[str, int, float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # experiments with an empty class/center cell (not in the mean)


def cosine_silhouette(Z: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Rousseeuw 1987) under cosine distance in O(N·K·D) instead of O(N²·D).

    For unit rows d_ij = 1 − z_i·z_j, so the summed distance from row i to cluster c is
    n_c − z_i·S_c with S_c = Σ_{j∈c} z_j: no N×N matrix (scikit-learn's ``silhouette_score(...,
    metric="cosine")`` builds it chunk by chunk, ~8 s per K on 20,400 rows; this is its value to
    roundoff, in float64). Singleton clusters score 0, as in scikit-learn.
    """
    Z = np.asarray(Z, dtype=np.float64)
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    _, own = np.unique(labels, return_inverse=True)
    n_clusters = int(own.max()) + 1
    if not 2 <= n_clusters <= len(Z) - 1:
        raise TubError(f"the silhouette needs 2..{len(Z) - 1} clusters, got {n_clusters}")
    onehot = np.zeros((len(Z), n_clusters))
    rows = np.arange(len(Z))
    onehot[rows, own] = 1.0
    sizes = onehot.sum(axis=0)
    dist_sums = sizes[None, :] - Z @ (onehot.T @ Z).T  # (N, K): Σ_{j∈c} d_ij, self included (d_ii ≈ 0)
    self_dist = 1.0 - np.einsum("ij,ij->i", Z, Z)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (dist_sums[rows, own] - self_dist) / (sizes[own] - 1)
        mean_other = dist_sums / sizes[None, :]
        mean_other[rows, own] = np.inf
        b = mean_other.min(axis=1)
        s = (b - a) / np.maximum(a, b)
    s[sizes[own] == 1] = 0.0
    return float(np.nan_to_num(s).mean())


def clustering_score_experiment(Z: np.ndarray, bio: np.ndarray, center: np.ndarray, K: int | None,
                                min_k: int, max_k: int, trials: int):
    """One experiment: (selected K, silhouette per K, per-trial (ari_bio, ari_center, cs))."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    Zn = Z / np.sqrt((Z ** 2).sum(axis=1))[:, None]
    sil = []
    if K is None:
        ks = np.linspace(min_k, max_k, max_k - min_k + 1, dtype=int)
        sil = [cosine_silhouette(Zn, KMeans(n_clusters=int(k), random_state=1337, init="random", n_init=20)
                                 .fit(Zn).labels_) for k in ks]
        K = int(ks[int(np.argmax(sil))])
        sil = list(zip(ks.tolist(), sil))
    out = []
    for t in range(trials):
        labels = KMeans(n_clusters=K, random_state=1337 + t, n_init=5, init="random").fit(Zn).labels_
        a_bio, a_mc = adjusted_rand_score(bio, labels), adjusted_rand_score(center, labels)
        out.append((a_bio, a_mc, a_bio - a_mc))
    return K, sil, out


def clustering_score(X: np.ndarray, meta: Metadata, K: int | None = None, min_k: int = 2, max_k: int = 30,
                     trials: int = 50, progress=None, check_only: bool = False,
                     max_k_flag: str = "--max-k") -> ClusteringResult | None:
    """Clustering score over all 2×2 class/center experiments (OOD rows dropped). ``check_only``: the
    input checks alone (``evaluate`` runs them before any metric writes); ``max_k_flag`` names the option."""
    if K is not None and K < 2:
        raise TubError(f"--K must be >= 2, got {K}")
    if min_k < 2 or min_k > max_k:
        raise TubError(f"--min-k must be >= 2 and <= {max_k_flag}; got {min_k}..{max_k}")
    if trials < 1:
        raise TubError("--trials must be at least 1")
    keep = np.flatnonzero(meta.subset != "OOD")
    check_nonzero_rows(X, meta, keep)
    bio, cen = meta.biological_class[keep], meta.medical_center[keep]
    classes, centers = list(dict.fromkeys(bio)), list(dict.fromkeys(cen))
    if len(classes) < 2 or len(centers) < 2:
        raise TubError(f"{meta.source}: the clustering score needs two classes and two centers; "
                       f"got {len(classes)} class(es) and {len(centers)} center(s)")
    cell_rows = {}
    for b in classes:
        for c in centers:
            r = keep[(bio == b) & (cen == c)]
            if len(r):
                cell_rows[(b, c)] = r
    experiments = list(product(combinations(classes, 2), combinations(centers, 2)))
    runnable, skipped = [], []  # (name, rows) of the experiments with all four cells, in the reference's order
    for (b1, b2), (c1, c2) in experiments:
        cells = [(b1, c1), (b1, c2), (b2, c1), (b2, c2)]
        if all(cc in cell_rows for cc in cells):
            runnable.append((f"{b1}-{b2}-{c1}-{c2}", np.concatenate([cell_rows[cc] for cc in cells])))
        else:
            skipped.append(f"{b1}-{b2}-{c1}-{c2}")
    if not runnable:
        raise TubError(f"{meta.source}: no 2×2 class/center experiment has all four cells; check the metadata")
    smallest, rows = min(runnable, key=lambda e: len(e[1]))
    if K is None and max_k >= len(rows):
        raise TubError(f"experiment {smallest} has {len(rows)} rows; lower {max_k_flag} below that")
    if K is not None and K > len(rows):
        raise TubError(f"experiment {smallest} has {len(rows)} rows, fewer than --K {K}; lower --K")
    if check_only:
        return None
    res = ClusteringResult({}, skipped=skipped)
    Ks, per_mean = [], []
    todo = progress(runnable, total=len(runnable), desc="clustering") if progress else runnable
    for name, rows in todo:
        k_sel, sil, out = clustering_score_experiment(X[rows], meta.biological_class[rows],
                                                      meta.medical_center[rows], K, min_k, max_k, trials)
        Ks.append(k_sel)
        res.silhouettes += [(name, k, s) for k, s in sil]
        res.aris += [(name, t, a, b, c) for t, (a, b, c) in enumerate(out)]
        cs = np.array([o[2] for o in out])
        per_mean.append((name, cs.mean(), cs.std(ddof=1) if trials > 1 else np.nan))
    per_mean.sort(key=lambda x: x[0])  # the reference groups by combination name (sorted)
    res.summary = {
        "clustering_score_mean": float(np.mean([m for _, m, _ in per_mean])),
        "clustering_score_mean_std": float(np.mean([s for _, _, s in per_mean])),
        "Ks": {"min": int(min(Ks)), "median": float(np.median(Ks)), "max": int(max(Ks))},
        "num_combinations": len(experiments),
        "num_trials": trials,
    }
    return res


def summary_from_aris(rows: list[tuple[str, float]], num_combinations: int, Ks=None, num_trials=None) -> dict:
    """Recompute the summary from an ``aris.csv`` (combination, clustering_score) table."""
    by: dict[str, list[float]] = {}
    for name, cs in rows:
        by.setdefault(name, []).append(cs)
    names = sorted(by)
    return {
        "clustering_score_mean": float(np.mean([np.mean(by[n]) for n in names])),
        "clustering_score_mean_std": float(np.mean([np.std(by[n], ddof=1) for n in names])),
        "num_combinations": num_combinations,
        "num_trials": num_trials or len(by[names[0]]),
    }
