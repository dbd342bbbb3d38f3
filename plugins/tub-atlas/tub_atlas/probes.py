"""Frozen-embedding probes, eva-style (spec §2.8): a linear probe and a kNN classifier.

Linear: one ``nn.Linear`` trained with cross-entropy, AdamW (lr 3e-4), batch 256, at most 12,500
steps, early stopping on validation balanced accuracy (patience 1,250 steps), best checkpoint kept;
repeated over seeds. kNN: cosine similarity on L2-normalised embeddings, k = 20, ``uniform`` vote
(ties -> smallest label, as scikit-learn) or ``weighted`` by exp(s / 0.07) (DINO, Caron et al. 2021,
arXiv 2104.14294, §4). Metric: balanced accuracy = mean per-class recall.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------ metrics
def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Balanced accuracy (mean recall over classes present), accuracy, macro-F1 and per-class recall
    (NaN, written as null, for a class with no rows in this split)."""
    cm = confusion(np.asarray(y_true), np.asarray(y_pred), n_classes)
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm).astype(float)
    present = support > 0
    recall = np.divide(tp, support, out=np.full(n_classes, np.nan), where=support > 0)  # NaN: no rows to recall
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    r0 = np.nan_to_num(recall)
    f1 = np.divide(2 * precision * r0, precision + r0, out=np.zeros(n_classes), where=(precision + r0) > 0)
    labels_seen = present | (predicted > 0)
    return {
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1[labels_seen].mean()) if labels_seen.any() else float("nan"),
        "recall_per_class": recall.tolist(),
        "f1_per_class": f1.tolist(),
        "support": support.tolist(),
    }


def balanced_accuracy(y_true, y_pred, n_classes: int | None = None) -> float:
    n = n_classes or int(max(np.max(y_true), np.max(y_pred)) + 1)
    return classification_metrics(y_true, y_pred, n)["balanced_accuracy"]


# ------------------------------------------------------------------ kNN
KNN_CHUNK = 4096  # test rows per similarity block at most
KNN_MEMORY = 256 << 20  # bytes of float64 similarities per block


def top_k_stable(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Per row the indices of the ``k`` largest values, ordered by (value descending, index ascending):
    exactly ``torch.sort(-sim, dim=1, stable=True).indices[:, :k]``, without sorting whole rows.

    ``torch.topk`` keeps ``m = 2k + 32`` candidates; where the m-th is below the k-th, every value tied
    with the k-th is among them, so a stable sort of the candidates (taken in index order) gives the
    full sort's first k. Rows whose ties reach past the candidates (or hold NaN) get the full sort."""
    n = sim.shape[1]
    m = min(n, 2 * k + 32)
    if k <= 0 or m >= n:
        return torch.sort(-sim, dim=1, stable=True).indices[:, :k]
    vals, idx = torch.topk(sim, m, dim=1, largest=True, sorted=True)
    short = ~(vals[:, m - 1] < vals[:, k - 1]) | torch.isnan(sim).any(1)  # ties may continue past the m-th
    idx, by_index = torch.sort(idx, dim=1)  # candidates in training-index order (indices are distinct)
    vals = torch.gather(vals, 1, by_index)
    order = torch.gather(idx, 1, torch.sort(-vals, dim=1, stable=True).indices[:, :k])
    if short.any():
        rows = short.nonzero().squeeze(1)
        order[rows] = torch.sort(-sim[rows], dim=1, stable=True).indices[:, :k]
    return order


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, k: int = 20,
                vote: str = "uniform", temperature: float = 0.07, chunk: int | None = None,
                memory_budget: int = KNN_MEMORY, return_votes: bool = False):
    """Cosine kNN on L2-normalised embeddings; labels are ints 0..n_classes-1.

    Test rows go in blocks of ``chunk`` (default: as many as fit ``memory_budget`` bytes of float64
    similarities, at most ``KNN_CHUNK``); neighbours are the k most similar training rows, equal
    similarities in training-index order (as a stable sort of distances), whatever the block size.
    ``return_votes``: also each class's share of the (weighted) votes, (n_test, n_classes), rows sum to 1
    (scikit-learn's ``predict_proba`` for the uniform vote)."""
    tr = F.normalize(torch.as_tensor(train_x, dtype=torch.float64), dim=1)
    te = F.normalize(torch.as_tensor(test_x, dtype=torch.float64), dim=1)
    ty = torch.as_tensor(train_y, dtype=torch.long)
    k = min(k, tr.shape[0])
    if chunk is None:
        chunk = max(1, min(KNN_CHUNK, memory_budget // (8 * max(1, tr.shape[0]))))
    preds, votes = [], []
    for s in range(0, te.shape[0], chunk):
        sim = te[s:s + chunk] @ tr.T
        order = top_k_stable(sim, k)
        top_sim = torch.gather(sim, 1, order)
        del sim
        labels = ty[order]
        w = torch.ones_like(top_sim) if vote == "uniform" else torch.exp(top_sim / temperature)
        scores = torch.zeros(top_sim.shape[0], n_classes, dtype=torch.float64).scatter_add_(1, labels, w)
        preds.append(scores.argmax(1))  # argmax returns the first maximum: ties -> smallest label
        if return_votes:
            votes.append(scores / scores.sum(1, keepdim=True))
    if not preds:
        pred, share = np.zeros(0, dtype=np.int64), np.zeros((0, n_classes))
    else:
        pred = torch.cat(preds).numpy()
        share = torch.cat(votes).numpy() if return_votes else None
    return (pred, share) if return_votes else pred


# ------------------------------------------------------------------ linear probe
def train_linear_probe(train_x, train_y, val_x, val_y, n_classes: int, seed: int = 0, lr: float = 3e-4,
                       batch_size: int = 256, max_steps: int = 12_500, patience: int = 1_250,
                       eval_every: int = 50, weight_decay: float = 0.0) -> tuple[nn.Linear, dict]:
    """Train one probe; returns the best-on-validation layer and its training record.

    Runs on one intra-op thread: the layer is tiny and multi-threaded spin-waits dominate otherwise
    (measured 40x slower on a loaded 2-core box).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_linear_probe(train_x, train_y, val_x, val_y, n_classes, seed, lr, batch_size, max_steps,
                                   patience, eval_every, weight_decay)
    finally:
        torch.set_num_threads(threads)


def _train_linear_probe(train_x, train_y, val_x, val_y, n_classes, seed, lr, batch_size, max_steps, patience,
                        eval_every, weight_decay):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = torch.as_tensor(train_x, dtype=torch.float32)
    Y = torch.as_tensor(train_y, dtype=torch.long)
    VX = torch.as_tensor(val_x, dtype=torch.float32)
    probe = nn.Linear(X.shape[1], n_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, best_step, since = -1.0, None, 0, 0
    perm, pos = torch.randperm(len(X), generator=g), 0
    for step in range(1, max_steps + 1):
        if pos + batch_size > len(X) and pos > 0:
            perm, pos = torch.randperm(len(X), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(probe(X[idx]), Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == max_steps:
            with torch.no_grad():
                pred = probe(VX).argmax(1).numpy()
            score = balanced_accuracy(val_y, pred, n_classes)
            if score > best:
                best, best_step, since = score, step, 0
                best_state = {k: v.clone() for k, v in probe.state_dict().items()}
            else:
                since += eval_every
                if since >= patience:
                    break
    probe.load_state_dict(best_state)
    return probe, {"best_val_balanced_accuracy": best, "best_step": best_step, "steps": step}


def predict_linear(probe: nn.Linear, x) -> np.ndarray:
    with torch.no_grad():
        return probe(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()


def linear_probabilities(probe: nn.Linear, x) -> np.ndarray:
    """Softmax of the probe's logits in float64 (rows sum to 1, as AUROC's one-vs-rest form needs)."""
    with torch.no_grad():
        logits = probe(torch.as_tensor(x, dtype=torch.float32)).double()
    return torch.softmax(logits, dim=1).numpy()


# ------------------------------------------------------------------ ranking metrics and intervals
def auroc(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> tuple[float, str | None]:
    """(AUROC, None), or (NaN, why) where it is undefined. Binary: the AUROC of the positive class (the
    second sorted class, column 1); more classes: the macro mean of one-vs-rest AUROCs, which needs
    every class among the rows (a class without rows has no ROC curve)."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64)
    absent = [classes[i] for i in np.flatnonzero(np.bincount(y_true, minlength=len(classes)) == 0)]
    if absent:
        return float("nan"), f"class(es) {', '.join(map(repr, absent))} have no test rows"
    if len(classes) == 2:
        return float(roc_auc_score(y_true == 1, proba[:, 1])), None
    return float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro",
                               labels=list(range(len(classes))))), None


def slide_bootstrap(metric_fn, slide_of_row, resamples: int, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals over slides (Efron & Tibshirani 1993, ch. 13): each draw takes as
    many slides as there are, with replacement, and all rows of every drawn slide (tiles of one slide are
    not independent, so resampling rows would make the intervals too narrow). ``metric_fn(rows)`` returns
    {name: value}; a draw where a metric is NaN (e.g. AUROC with a class missing) is left out for it, and
    a metric defined in fewer than half the draws gets no interval (null). The draws and keys are
    ``tubcli.stats.bootstrap_intervals``' (as tub-xmil's slide intervals), plus ``slides``."""
    from tubcli.stats import bootstrap_intervals

    slides, inverse = np.unique(np.asarray(slide_of_row, dtype=object).astype(str), return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(slides))]
    ci = bootstrap_intervals(lambda pick: metric_fn(np.concatenate([rows_of[i] for i in pick])), len(slides),
                             resamples, seed=seed, level=level)
    return {**ci, "slides": int(len(slides))}


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over runs of each scalar metric."""
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in runs], dtype=float)
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out
