"""Task metrics: AUROC and balanced accuracy, R^2 and Pearson r, Harrell's C-index, Kaplan-Meier and the log-rank
test of risk groups; AUPRC-2."""

from __future__ import annotations

import warnings

import numpy as np


def classification_metrics(y_true, proba) -> dict:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, float)
    present = np.unique(y_true)
    # undefined on one class, as AUROC: it would be that class's recall, another quantity (1.0 for a model that
    # says one class everywhere), which inflated fold means and bootstrap intervals; reported as null, and said why
    out = {"balanced_accuracy": float("nan"), "auroc": float("nan")}
    if len(present) > 1:  # over the classes present (an evaluation set may lack some of the model's)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, proba.argmax(1)))
        # multi-class: macro one-vs-rest over the classes present
        out["auroc"] = float(roc_auc_score(y_true, proba[:, 1]) if proba.shape[1] == 2
                             else np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in present]))
    return out


def regression_metrics(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    ss_res = ((y_true - y_pred) ** 2).sum()
    ss_tot = ((y_true - y_true.mean()) ** 2).sum()
    # a constant target (or prediction) has no R² (Pearson r): np.ptp, not the sum of squares, decides, since
    # the mean of equal floats can miss them by a rounding step (ss_tot ~1e-33 gave R² = -7e29)
    varied = len(y_true) > 1 and np.ptp(y_true) > 0
    defined = varied and np.ptp(y_pred) > 0
    r = np.corrcoef(y_true, y_pred)[0, 1] if defined else float("nan")
    return {"r2": float(1 - ss_res / ss_tot) if varied else float("nan"), "pearson_r": float(r)}


def undefined_reason(task: str, labels=None, times=None, events=None) -> str | None:
    """Why the task's headline metric (AUROC, R², C-index) cannot be computed on these slides, or None.

    A validation or test set of one class, a constant target or no comparable pair gives no number;
    the caller says so instead of letting a fallback (or a missing key) pass unnoticed."""
    if task == "classification":
        present = np.unique(np.asarray(labels).astype(int))
        return None if len(present) > 1 else (f"AUROC and balanced accuracy are undefined: all {len(labels)} slides "
                                              "have one class")
    if task == "regression":
        y = np.asarray(labels, float)
        return None if len(y) > 1 and np.ptp(y) > 0 else f"R² is undefined: the target is constant over {len(y)} slides"
    t, e = np.asarray(times, float), np.asarray(events, float)
    comparable = any(((t > t[i]) | ((t == t[i]) & (e == 0))).any() for i in range(len(t)) if e[i])
    return None if comparable else (f"C-index is undefined: no comparable pair among {len(t)} slides "
                                    f"({int(e.sum())} events)")


def concordance_index(times, events, risks) -> float:
    """Harrell's C: over comparable pairs, the share with risk_i > risk_j (risk ties count 1/2).

    A pair is comparable when i has the event and t_i < t_j, or t_i = t_j and j is censored (the
    censored patient outlived the event time): the convention of lifelines and scikit-survival's
    ``concordance_index_censored``, which survival MIL papers report. Two events at one time are not
    comparable."""
    t, e, r = (np.asarray(a, float) for a in (times, events, risks))
    num = den = 0.0
    for i in range(len(t)):
        if not e[i]:
            continue
        comp = (t > t[i]) | ((t == t[i]) & (e == 0))
        den += comp.sum()
        num += (r[i] > r[comp]).sum() + 0.5 * (r[i] == r[comp]).sum()
    return float(num / den) if den else float("nan")


def kaplan_meier(times, events) -> tuple[np.ndarray, np.ndarray]:
    """(event times, S(t) just after each): the product-limit estimator S(t) = prod_{t_j <= t} (1 - d_j / n_j)
    over the distinct event times t_j, with d_j events among the n_j still at risk (Kaplan & Meier 1958).
    A patient censored at t_j counts as at risk at t_j."""
    t, e = np.asarray(times, float), np.asarray(events, bool)
    at = np.unique(t[e])
    n = np.array([(t >= u).sum() for u in at], float)
    d = np.array([(t[e] == u).sum() for u in at], float)
    return at, np.cumprod(1 - d / n)


def logrank(times, events, group) -> tuple[float, float]:
    """(chi², p) of the two-sample log-rank test of ``group`` (bool) against the rest (Mantel 1966; Peto &
    Peto 1972): over the distinct event times, observed minus expected events of the group, with the
    hypergeometric variance, chi² = (O - E)² / V on 1 degree of freedom."""
    from scipy.stats import chi2

    t, e, g = np.asarray(times, float), np.asarray(events, bool), np.asarray(group, bool)
    o_minus_e = var = 0.0
    for u in np.unique(t[e]):
        at_risk = t >= u
        n, n1 = at_risk.sum(), (at_risk & g).sum()
        d, d1 = (e & (t == u)).sum(), (e & (t == u) & g).sum()
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if var <= 0:
        return float("nan"), float("nan")
    stat = o_minus_e ** 2 / var
    return float(stat), float(chi2.sf(stat, 1))


def median_split(risks) -> np.ndarray:
    """True for the high-risk slides: predicted risk above the median (the usual survival-MIL figure, e.g.
    PORPOISE, Chen et al. 2022)."""
    r = np.asarray(risks, float)
    return r > np.median(r)


def risk_groups(times, events, high) -> dict:
    """The log-rank test of the high-risk slides (``high``: bool per slide) against the others; null where a
    group is empty or no slide has an event."""
    high = np.asarray(high, bool)
    chi, p = logrank(times, events, high) if 0 < high.sum() < len(high) else (float("nan"), float("nan"))
    return {"logrank_chi2": chi, "logrank_p": p, "high_risk_slides": int(high.sum()),
            "low_risk_slides": int((~high).sum())}


def auprc2(evidence: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean of AP(evidence > 0, s) and AP(evidence < 0, -s), each only when non-degenerate (spec §2.6)."""
    from sklearn.metrics import average_precision_score

    vals = []
    pos, neg = evidence > 0, evidence < 0
    if 0 < pos.sum() < len(pos):
        vals.append(average_precision_score(pos, scores))
    if 0 < neg.sum() < len(neg):
        vals.append(average_precision_score(neg, -scores))
    return float(np.mean(vals)) if vals else None
