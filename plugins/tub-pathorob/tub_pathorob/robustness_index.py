"""Robustness index (RI) of Kömen et al., arXiv 2507.17845 (2025), with the PathoROB protocol.

For every tile (query) the k nearest tiles (Euclidean on L2-normalised features) from *other slides*
are classified as SS (same class, same center), SO (same class, other center), OS (other class,
same center) or OO; counts are pooled over all queries and

    RI(k) = C_SO(k) / (C_SO(k) + C_OS(k))                                     (paper, Eq. 1)

i.e. among neighbours that share exactly one of class/center, the share that shares the class.
The protocol details (same-slide exclusion, truncation of all rows to the shortest remaining
neighbour list, pooled cumulative counts, default k per dataset, k search by kNN balanced accuracy,
paired 2×2 subsets, row shuffle with legacy seed 123) follow the official code (spec §2.2) so that
values agree with it to floating-point rounding; the implementation is vectorised.
Older ``bio_vs_confounding`` index: de Jong et al., arXiv 2501.18055.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tubcli.errors import TubError

from .metadata import Metadata, check_evaluation_set

DEFAULT_K = {"camelyon": 11, "tcga": 61, "tolkach_esca": 46}
MAX_K_SEARCH = {"camelyon": 600, "tcga": 600, "tolkach_esca": 1000}
MAX_K_SEARCH_PAIRED = 1200
SHUFFLE_SEED = 123
_CHUNK = 1 << 20  # entries per chunk of the (queries × neighbours) bookkeeping
SUMMARY_KEYS = (
    "k_opt", "balanced_accuracy", "robustness_index", "ID_performance", "OOD_performance",
    "generalization_index", "bio_vs_confounding", "confounder_insensitivity",
    "normalized_confounder_insensitivity", "prediction_performance", "confounder_log_reg_AUC",
)


def k_candidates(max_k: int) -> np.ndarray:
    """The official k grid up to ``max_k`` inclusive: 1, 3, 5, 7, 9, then 11, 21, … (the official ``max_k``
    600, 1000 and 1200 give the reference's ``range(11, max_k, 10)``)."""
    if max_k < 1:
        raise TubError(f"--max-k must be >= 1, got {max_k}")
    return np.array([k for k in (1, 3, 5, 7, 9) if k <= max_k] + list(range(11, max_k + 1, 10)))


def check_nonzero_rows(X: np.ndarray, meta: Metadata, rows: np.ndarray) -> None:
    """One-line error naming the first all-zero row of ``X`` among ``rows`` (row numbers as the user gave
    them: the metadata/feature row, with its slide, patch and center)."""
    X = np.asarray(X)
    zero = rows[~X.any(axis=1)[rows]]  # no copy of the rows
    if len(zero):
        r = int(zero.min())
        raise TubError(f"feature row {r} (slide {meta.slide_id[r]}, patch {meta.patch_id[r]}, center "
                       f"{meta.medical_center[r]}) is all zeros; the metrics need non-zero embeddings")


def _log():
    from tubcli.progress import get_logger

    return get_logger()


def identical_rows_across_slides(Xn: np.ndarray, slide: np.ndarray) -> int:
    """How many rows of ``Xn`` are bit-identical to a row of another slide (duplicate tiles, blank background,
    float16 exports): their distances tie, so the row order decides which of them is the nearer neighbour.

    Rows are hashed first and compared bit for bit only where hashes repeat: a sort of the whole matrix
    as byte strings held several copies of it (1.3 GB for a 196 MB feature matrix)."""
    if len(Xn) < 2:
        return 0
    hashes = row_hashes(Xn)
    _, inverse, count = np.unique(hashes, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(count[inverse.ravel()] > 1)
    if len(candidates) == 0:
        return 0
    Xc = np.ascontiguousarray(Xn[candidates])
    rows = Xc.view(np.dtype((np.void, Xc.dtype.itemsize * Xc.shape[1]))).ravel()
    _, inverse, count = np.unique(rows, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    dup = np.flatnonzero(count[inverse] > 1)
    if len(dup) == 0:
        return 0
    slide = np.asarray(slide)[candidates]
    _, slide_codes = np.unique(np.asarray(slide).astype(str), return_inverse=True)
    pairs = np.unique(np.stack([inverse[dup], slide_codes.ravel()[dup]], axis=1), axis=0)  # (row value, slide)
    slides_per_value = np.bincount(pairs[:, 0], minlength=len(count))
    return int(np.count_nonzero(slides_per_value[inverse[dup]] > 1))


def row_hashes(X: np.ndarray, block: int = 1024) -> np.ndarray:
    """A 64-bit hash of each row's bytes (a random linear form modulo 2^64 over its 32- or 8-bit words),
    in blocks of rows: equal rows get equal hashes, unequal ones collide with probability ~2^-64."""
    X = np.asarray(X)
    width = X.dtype.itemsize * X.shape[1]
    word = np.uint32 if width % 4 == 0 else np.uint8
    multipliers = np.random.default_rng(0).integers(1, 2 ** 63, width // np.dtype(word).itemsize,
                                                    dtype=np.uint64) * 2 + 1
    out = np.empty(len(X), dtype=np.uint64)
    for s in range(0, len(X), block):
        words = np.ascontiguousarray(X[s:s + block]).view(np.uint8).view(word).reshape(-1, len(multipliers))
        out[s:s + block] = (words.astype(np.uint64) * multipliers).sum(axis=1, dtype=np.uint64)
    return out


def duplicate_tiles(meta: Metadata) -> tuple[int, tuple[str, str], list[str]]:
    """Rows that repeat a tile (slide_id, patch_id) seen earlier in ``meta``, the first such tile and the
    subsets it occurs in."""
    keys = np.array([f"{s}\x00{p}" for s, p in zip(meta.slide_id, meta.patch_id)], dtype=object)
    _, first, inverse, count = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    repeats = int(len(keys) - len(first))
    if not repeats:
        return 0, ("", ""), []
    i = int(np.flatnonzero(count[inverse] > 1).min())  # the first row (in this order) of a repeated tile
    rows = np.flatnonzero(inverse == inverse[i])
    return repeats, (str(meta.slide_id[i]), str(meta.patch_id[i])), sorted({str(s) for s in meta.subset[rows]})


def single_center_classes(meta: Metadata) -> dict[str, str]:
    """{class: its only medical center} for the classes of ``meta`` seen at one center only."""
    out = {}
    for c in np.unique(meta.biological_class):
        centers = np.unique(meta.medical_center[meta.biological_class == c])
        if len(centers) == 1:
            out[str(c)] = str(centers[0])
    return out


def l2_normalize(X: np.ndarray, copy: bool = True) -> np.ndarray:
    """Row-wise L2 normalisation (sklearn ``normalize``, as the reference's ``Normalizer``); ``copy=False``
    normalises a float array of one's own in place."""
    from sklearn.preprocessing import normalize

    return normalize(X, norm="l2", copy=copy)


def _take(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``X[rows]``, without the copy when ``rows`` is every row in order (an unpaired evaluation set)."""
    return X if len(rows) == len(X) and np.array_equal(rows, np.arange(len(X))) else X[rows]


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique labels and integer codes (``LabelEncoder`` order)."""
    labels, codes = np.unique(values.astype(str), return_inverse=True)
    return labels, codes.astype(np.int32)


@dataclass
class NeighbourSet:
    """Neighbours of every query in one evaluation set after same-slide exclusion and truncation."""

    neighbours: np.ndarray          # (n, m) local row indices, nearest first
    bio: np.ndarray                 # (n,) class codes (sorted order)
    center: np.ndarray              # (n,) center codes
    slide: np.ndarray               # (n,) slide codes
    n_neighbors_queried: int

    @property
    def m(self) -> int:
        return self.neighbours.shape[1]

    def same_bio(self, m: int | None = None) -> np.ndarray:
        nb = self.neighbours[:, :m]
        return self.bio[nb] == self.bio[:, None]

    def same_center(self, m: int | None = None) -> np.ndarray:
        nb = self.neighbours[:, :m]
        return self.center[nb] == self.center[:, None]

    def category_counts(self, m: int | None = None) -> np.ndarray:
        """(4, m) column counts of SS, SO, OS, OO over queries (neighbour rank j = column j)."""
        nb = self.neighbours[:, :m]
        out = np.zeros((4, nb.shape[1]), dtype=np.int64)
        step = _CHUNK // max(nb.shape[1], 1) + 1  # row chunks keep the temporaries small
        for s in range(0, len(nb), step):
            q = slice(s, s + step)
            sb = self.bio[nb[q]] == self.bio[q, None]
            sc = self.center[nb[q]] == self.center[q, None]
            ss = np.count_nonzero(sb & sc, axis=0)
            so = np.count_nonzero(sb, axis=0) - ss
            os_ = np.count_nonzero(sc, axis=0) - ss
            out += np.stack([ss, so, os_, len(sb) - ss - so - os_])
        return out

    def balanced_accuracies(self, ks) -> np.ndarray:
        """kNN balanced accuracy of the class for each k (majority vote, ties -> smallest label)."""
        ks = np.minimum(np.asarray(ks, dtype=np.int64), self.m)
        labels = self.bio[self.neighbours[:, : int(ks.max())]]
        n_cls = int(self.bio.max()) + 1
        votes = np.empty((len(self.bio), len(ks), n_cls), dtype=np.int32)
        for c in range(n_cls):
            votes[:, :, c] = np.cumsum(labels == c, axis=1, dtype=np.int32)[:, ks - 1]
        pred = votes.argmax(axis=2)  # first maximum = smallest label, as scipy.stats.mode
        return np.array([balanced_accuracy(self.bio, pred[:, i]) for i in range(len(ks))])


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (sklearn's definition)."""
    classes, counts = np.unique(y_true, return_counts=True)
    correct = np.bincount(y_true[y_true == y_pred], minlength=int(classes.max()) + 1)[classes]
    return float(np.mean(correct / counts))


def nearest_other_slide_neighbours(X: np.ndarray, slide: np.ndarray, k_required: int) -> tuple[np.ndarray, int]:
    """kNN of every row among all rows, with the query's own slide removed and all rows truncated
    to the shortest remaining list (spec §2.2 steps 2–3). The result is that of querying
    ``n_nb = k_required + max tiles per slide`` neighbours and dropping the own slide, but the own slide is
    excluded before the selection (``nearest_other_group_neighbours``), so the cost does not grow with
    the largest slide."""
    from .knn import nearest_other_group_neighbours

    n = len(X)
    max_tiles = int(np.bincount(slide).max())
    n_nb = min(k_required + max_tiles, n)
    out, m = nearest_other_group_neighbours(X, slide, n_nb)
    if m == 0:
        raise TubError("a query has no neighbour from another slide; each set needs at least two slides")
    return out, n_nb


def neighbour_set(X: np.ndarray, meta: Metadata, k_required: int) -> NeighbourSet:
    _, bio = _codes(meta.biological_class)
    _, center = _codes(meta.medical_center)
    _, slide = _codes(meta.slide_id)
    nb, n_nb = nearest_other_slide_neighbours(X, slide, k_required)
    return NeighbourSet(nb, bio, center, slide, n_nb)


def metrics_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """All RI-family curves over k = 1..m from (4, m) per-rank counts (reference arithmetic)."""
    cum = np.cumsum(counts, axis=1)
    total = cum.sum(0)
    SS, SO, OS, OO = (c / total for c in cum)
    with np.errstate(invalid="ignore", divide="ignore"):  # e.g. no OO neighbour at small k
        return {
            "prediction_performance": (SS + SO) / (SS + SO + OS + OO),
            "ID_performance": SS / (SS + OS),
            "OOD_performance": SO / (SO + OO),
            "confounder_insensitivity": (SO + OO) / (SS + OS),
            "normalized_confounder_insensitivity": ((SO + OO) / (SO[-1] + OO[-1])) / ((SS + OS) / (SS[-1] + OS[-1])),
            "bio_vs_confounding": (SS + SO) / (SS + OS),
            "robustness_index": SO / (SO + OS),
            "generalization_index": (SS * SO + SO * OS) / (SS * SO + SS * OO),
        }


def confounder_auc(X: np.ndarray, center: np.ndarray, groups: np.ndarray, n_splits: int = 5) -> float:
    """Mean fold ROC AUC of a logistic regression predicting the center (spec §2.2)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.preprocessing import StandardScaler

    Xs = StandardScaler().fit_transform(X)
    _, y = _codes(center)
    if len(np.unique(groups)) < n_splits:
        raise TubError(f"the confounder AUC needs at least {n_splits} slides/cases; got {len(np.unique(groups))}")
    aucs = []
    for tr, te in StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=42).split(Xs, y, groups):
        ntr, nte = len(np.unique(y[tr])), len(np.unique(y[te]))
        if not (ntr > 1 and nte > 1 and ntr == nte):
            continue
        clf = LogisticRegression(solver="lbfgs", max_iter=1000).fit(Xs[tr], y[tr])
        p = clf.predict_proba(Xs[te])
        auc = roc_auc_score(y[te], p[:, 1]) if nte == 2 else roc_auc_score(y[te], p, multi_class="ovr")
        aucs.append(1.0 - auc if auc < 0.5 else auc)
    return float(np.mean(aucs)) if aucs else float("nan")


def shuffle_and_reduce(meta: Metadata, max_patches_per_combi: int | None = None, shuffle: bool = True) -> np.ndarray:
    """Row order of the reference: a fixed permutation (legacy seed 123), then optionally (M >= 1) the first
    M rows per (subset, class-center); None keeps all rows. Returns row indices into ``meta``."""
    n = len(meta)
    order = np.random.RandomState(SHUFFLE_SEED).permutation(n) if shuffle else np.arange(n)
    if max_patches_per_combi is not None:
        if max_patches_per_combi < 1:
            raise TubError(f"--max-patches-per-combi must be >= 1, got {max_patches_per_combi}; omit it to keep all rows")
        seen: dict[tuple, int] = {}
        keep = []
        for i in order:
            key = (meta.subset[i], meta.biological_class[i], meta.medical_center[i])
            if seen.get(key, 0) < max_patches_per_combi:
                seen[key] = seen.get(key, 0) + 1
                keep.append(i)
        order = np.array(keep, dtype=np.int64)
    return order


@dataclass
class RobustnessResult:
    summary: dict
    k_grid: np.ndarray                      # k candidates evaluated for balanced accuracy
    bal_acc: np.ndarray                     # balanced accuracy per k_grid (mean over subsets)
    bal_acc_std: np.ndarray
    curves: dict[str, np.ndarray]           # over k = 1..m
    sets: list[tuple[str, np.ndarray, NeighbourSet]] = field(default_factory=list)  # (subset, rows, neighbours)
    meta: Metadata | None = None
    bootstrap_units: int = 0                # tiles or slides the bootstrap resampled (0: no bootstrap)


def robustness_index(
    X: np.ndarray,
    meta: Metadata,
    *,
    k: int | None = None,
    k_search: bool = False,
    dataset: str | None = None,
    paired: bool | None = None,
    max_patches_per_combi: int | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    auc: bool = True,
    shuffle: bool = True,
    max_k: int | None = None,
    min_neighbours: int = 0,
    bootstrap_unit: str = "tile",
    warn: bool = True,
) -> RobustnessResult:
    """PathoROB robustness index and its companion metrics (spec §2.2).

    ``X`` (N, D) row-aligned with ``meta``; ``OOD`` rows are dropped. ``k`` defaults to the
    dataset's value (camelyon 11, tcga 61, tolkach_esca 46); ``k_search`` picks k by kNN balanced
    accuracy over the official grid. ``paired`` evaluates every ``subset`` separately and pools the
    counts (default for ``tcga``). ``max_patches_per_combi`` (None: all rows) keeps the first M rows per
    (subset, class-center). ``min_neighbours`` queries more neighbours (for RI(k) curves);
    it changes only ``normalized_confounder_insensitivity``, which depends on the truncation length.
    ``bootstrap_unit`` is what ``bootstrap`` resamples: ``tile`` (query rows, the reference's) or ``slide``
    (slides with all their query rows). ``warn`` logs the input warnings (duplicate feature rows, a class at
    one center, k candidates dropped from the search grid).
    """
    meta = Metadata.of(meta)  # a DataFrame by position, checked as a CSV is
    X = np.asarray(X)
    if X.ndim != 2:
        raise TubError(f"features must be a 2-D array (rows, dims), got shape {X.shape}")
    if X.shape[0] != len(meta):
        raise TubError(f"features have {X.shape[0]} rows but the metadata {len(meta)}")
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if len(bad):
        raise TubError(f"feature row {bad[0]} (slide {meta.slide_id[bad[0]]}) holds NaN or inf; re-extract it")
    from .metadata import subset_kind

    subsets = subset_kind(meta) != "id"
    if paired is None:  # tcga_2x2 is evaluated paired, tcga_4x4 (ID/OOD) unpaired (spec §2.1)
        paired = dataset == "tcga" and subsets
    if paired and dataset in ("camelyon", "tolkach_esca"):
        raise TubError(f"paired evaluation is defined for tcga only, not {dataset}; drop --paired")
    if paired and not subsets:
        raise TubError(f"{meta.source} has only ID/OOD subsets, nothing to pair (tcga_2x2 has b1-b2-c1-c2 "
                       "subsets); drop --paired")
    if k_search and k is not None:
        raise TubError("give --k N or --k-search, not both")
    if max_k is not None and not k_search:
        raise TubError("--max-k sets the k-search grid; add --k-search or drop --max-k")
    if k_search:
        grid_max = max_k if max_k is not None else (MAX_K_SEARCH_PAIRED if paired else MAX_K_SEARCH.get(dataset or ""))
        if grid_max is None:
            raise TubError("k search on a custom dataset needs --max-k (the official grids are 600/1000/1200)")
        candidates = k_candidates(grid_max)
    else:
        if k is None:
            if dataset not in DEFAULT_K:
                raise TubError("no default k for a custom dataset; pass --k N or --k-search")
            k = DEFAULT_K[dataset]
        if k < 1:
            raise TubError(f"k must be >= 1, got {k}")
        candidates = np.array([k])

    id_rows = np.flatnonzero(meta.subset != "OOD")
    meta_id = meta.take(id_rows)
    check_evaluation_set(meta_id, None if k_search else k)
    order = shuffle_and_reduce(meta_id, max_patches_per_combi, shuffle)
    rows_all = id_rows[order]
    check_nonzero_rows(X, meta, rows_all)
    meta_s = meta.take(rows_all)
    if not paired:  # paired-shaped subsets merged into one set: a tile shared by subsets would count twice
        repeats, (slide_id, patch_id), where = duplicate_tiles(meta_s)
        if repeats:
            raise TubError(
                f"{meta.source}: tile (slide_id {slide_id}, patch_id {patch_id}) occurs more than once in the unpaired "
                f"evaluation set (subsets {', '.join(where)}; {repeats} repeated row(s) in all), so it would be "
                "counted twice as a query and as a tied neighbour; pass --paired (ri, evaluate, explain) to evaluate "
                "each subset on its own, or drop the duplicate rows")
    Xn = l2_normalize(np.asarray(X)[rows_all], copy=False)  # the fancy index made a copy of our own

    if paired:
        names = np.unique(meta_s.subset)
        groups = [(str(s), np.flatnonzero(meta_s.subset == s)) for s in names]
    else:
        groups = [("ID", np.arange(len(meta_s)))]

    case_groups = dataset == "tcga"
    sets, accs, counts, aucs, eff_k = [], [], [], [], None
    identical, lonely = 0, {}
    for name, rows in groups:
        sub = meta_s.take(rows)
        if warn:
            identical += identical_rows_across_slides(_take(Xn, rows), sub.slide_id)
            lonely.update(single_center_classes(sub))
        if len(np.unique(sub.medical_center)) < 2 or len(np.unique(sub.biological_class)) < 2:
            raise TubError(f"subset {name!r} needs two classes and two centers; fix the paired metadata")
        if paired and not k_search:  # each subset is its own kNN problem: the pooled class sizes do not tell
            check_evaluation_set(Metadata(sub.columns, f"{meta.source}: subset {name!r}"), k)
        ks = candidates[candidates <= len(rows)]
        if len(ks) == 0:
            raise TubError(f"subset {name!r} has {len(rows)} rows, fewer than k={candidates[0]}")
        ns = neighbour_set(_take(Xn, rows), sub, max(int(ks[-1]), min_neighbours))
        if not paired or len(candidates) == 1:  # (a k search of paired subsets keeps one grid for all)
            ks = ks[ks <= ns.m]
            if len(ks) == 0:
                raise TubError(
                    f"only {ns.m} neighbours remain after excluding each query's slide, fewer than k={candidates[0]}; "
                    "lower k"
                )
        eff_k = np.minimum(ks, ns.m)
        accs.append(ns.balanced_accuracies(ks))
        counts.append(ns.category_counts())
        sets.append((name, rows, ns))
        if auc:
            g = sub.case_id if case_groups else sub.slide_id
            aucs.append(confounder_auc(_take(Xn, rows), sub.medical_center, np.asarray(g, dtype=str)))

    if identical:
        _log().warning(
            "%d feature row(s) of the evaluation set are identical to a row of another slide (duplicate tiles, blank "
            "background, float16 exports?): their distances tie, and tub breaks ties by row order (stable, after "
            "the seed-123 shuffle) where scikit-learn's NearestNeighbors may order them otherwise, so the "
            "neighbours and the RI depend on that order; deduplicate or drop such tiles", identical)
    if lonely:
        _log().warning(
            "class(es) %s occur at one medical center only: no neighbour of the same class can come from "
            "another center (SO = 0), so their queries add only to OS and lower the RI structurally, for every "
            "model alike; drop the class or add its tiles from another center to compare centers on it",
            ", ".join(f"{c} (only at {ctr})" for c, ctr in sorted(lonely.items())))
    m = min(c.shape[1] for c in counts)
    pooled = sum(c[:, :m] for c in counts)
    curves = metrics_from_counts(pooled)
    n_acc = min(len(a) for a in accs)
    k_grid = (eff_k if paired else candidates[candidates <= m])[:n_acc]
    n_acc = min(n_acc, len(k_grid))
    if warn and k_search:
        _log_cut_grid(candidates, k_grid[:n_acc], m, paired, max(int(np.bincount(s.slide).max()) for _, _, s in sets))
    acc_mat = np.array([a[:n_acc] for a in accs])
    bal, bal_std = acc_mat.mean(0), acc_mat.std(0)
    i_opt = int(np.argmax(bal))
    k_opt = int(k_grid[i_opt])
    if k_opt > m:
        raise TubError(f"k={k_opt} exceeds the {m} neighbours left after same-slide exclusion; lower k")

    j = k_opt - 1
    summary = {"k_opt": k_opt, "balanced_accuracy": float(bal[i_opt])}
    for key in ("robustness_index", "ID_performance", "OOD_performance", "generalization_index",
                "bio_vs_confounding", "confounder_insensitivity", "normalized_confounder_insensitivity",
                "prediction_performance"):
        summary[key] = float(curves[key][j])
    summary["confounder_log_reg_AUC"] = float(np.mean(aucs)) if auc else None
    bootstrap_units = 0
    if bootstrap:
        boot = bootstrap_robustness_index(sets, k_opt, bootstrap, seed, unit=bootstrap_unit,
                                          slides=np.concatenate([meta_s.slide_id[rows] for _, rows, _ in sets]))
        summary["robustness_index-mean"] = boot["mean"]
        summary["robustness_index-std"] = boot["std"]
        summary["robustness_index-ci95"] = boot["ci95"]
        summary["bootstrap_unit"] = bootstrap_unit
        bootstrap_units = boot["units"]
    return RobustnessResult(summary, k_grid[:n_acc], bal, bal_std, curves, sets, meta_s, bootstrap_units)


def _log_cut_grid(candidates: np.ndarray, k_grid: np.ndarray, m: int, paired: bool, max_tiles: int) -> None:
    """One line when the k search evaluated fewer (or lower) k than its grid holds, and why."""
    cand = [int(c) for c in candidates]
    grid = [int(k) for k in k_grid]
    if not paired:
        dropped = [c for c in cand if c not in set(grid)]
        if dropped:
            _log().warning("--k-search: k = %s dropped from the grid: only %d neighbours remain after excluding "
                           "each query's own slide (largest slide: %d tiles), so k is searched up to %d",
                           ", ".join(map(str, dropped)), m, max_tiles, grid[-1] if grid else 0)
        return
    dropped = cand[len(grid):]
    clamped = [c for c, k in zip(cand, grid) if c != k]
    parts = []
    if dropped:
        parts.append(f"k = {', '.join(map(str, dropped))} dropped from the grid (more than the rows of a subset)")
    if clamped:
        parts.append(f"k = {', '.join(map(str, clamped))} evaluated at the {m} neighbours a subset has left "
                     f"after excluding each query's own slide (largest slide: {max_tiles} tiles)")
    if parts:
        _log().warning("--k-search (paired): %s", "; ".join(parts))


def per_query_cumulative(ns: NeighbourSet, k: int) -> np.ndarray:
    """(n, 4) counts of SS, SO, OS, OO among each query's first k neighbours."""
    sb, sc = ns.same_bio(k), ns.same_center(k)
    return np.stack([(sb & sc).sum(1), (sb & ~sc).sum(1), (~sb & sc).sum(1), (~sb & ~sc).sum(1)], axis=1)


def bootstrap_robustness_index(sets, k: int, n_bootstrap: int, seed: int = 0, unit: str = "tile",
                               slides: np.ndarray | None = None) -> dict:
    """Bootstrap of RI at k: ``unit="tile"`` resamples the query rows (pooled over subsets; the reference's
    protocol), ``unit="slide"`` resamples slides (as many as there are, with replacement) with all their query
    rows in every subset (a cluster bootstrap: tiles of one slide are correlated, so resampling tiles
    understates the uncertainty). Each draw is ``tubcli.stats.bootstrap_intervals``' (``n`` draws of ``n``
    units from ``numpy.random.default_rng(seed)``). {mean, std (ddof 1), ci95: 95 % percentile interval
    [low, high] (None when RI is undefined in more than half the draws), units}."""
    from tubcli.stats import bootstrap_intervals

    if unit not in ("tile", "slide"):
        raise TubError(f"--bootstrap-unit must be tile or slide, got {unit!r}")
    q = np.concatenate([per_query_cumulative(ns, k) for _, _, ns in sets])
    so, os_ = q[:, 1].astype(np.float64), q[:, 2].astype(np.float64)
    if unit == "slide":
        if slides is None or len(slides) != len(q):
            raise ValueError("a slide bootstrap needs the slide of every query row")
        _, of = np.unique(np.asarray(slides).astype(str), return_inverse=True)
        so, os_ = np.bincount(of.ravel(), weights=so), np.bincount(of.ravel(), weights=os_)
    draws = []

    def ri(idx):
        s, o = so[idx].sum(), os_[idx].sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            draws.append(s / (s + o))
        return {"robustness_index": draws[-1]}

    ci = bootstrap_intervals(ri, len(so), n_bootstrap, seed=seed)
    draws = np.asarray(draws, dtype=np.float64)
    return {"mean": float(draws.mean()), "std": float(draws.std(ddof=1)) if n_bootstrap > 1 else float("nan"),
            "ci95": ci["robustness_index"], "units": int(len(so))}
