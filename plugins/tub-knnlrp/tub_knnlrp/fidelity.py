"""Faithfulness checks of the neuralization: sign agreement, conservation, the SVM identity (§2.2–2.3, §6).

* **sign agreement**: binary, sign(g) against the model's ``predict`` (kNN) or
  sign(``decision_function``) (SVM); multiclass, the fraction of rows whose predicted class wins
  every pairwise network (g_c > 0), which need not be 100% (spec §2.4).
* **conservation** (kNN, midpoint rule): |Σ_d R_d − g_κ| / max(1, |g_κ|), exact for every κ.
* **SVM identity** (β = γ): γ(Σp⁻z⁻ − Σp⁺z⁺) = g − (H(p⁺) − H(p⁻)); the midpoint relevances sum
  to Σp⁻z⁻ − Σp⁺z⁺ minus the pooled constants (log-α terms and the intercept), so
  γ(Σ_d R^mid + offsets) − g + H(p⁺) − H(p⁻) must vanish.
"""

from __future__ import annotations

import numpy as np

from tub_knnlrp.explanation import NeuralizedExplainer
from tub_knnlrp.networks import NeuralizedSVM
from tub_knnlrp.neuralize import transform_steps
from tub_knnlrp.rules import midpoint_relevance


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy per row (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)


def svm_identity_residual(net: NeuralizedSVM, Z) -> np.ndarray:
    """|γ(Σp⁻z⁻ − Σp⁺z⁺) − g + H(p⁺) − H(p⁻)| per row, at β = γ."""
    z_pos, z_neg = net.units(Z)
    p_pos, p_neg = net.pooling(Z)
    lhs = net.gamma * ((p_neg * z_neg).sum(axis=1) - (p_pos * z_pos).sum(axis=1))
    rhs = net.forward(Z) - (entropy(p_pos) - entropy(p_neg))
    return np.abs(lhs - rhs)


def svm_midpoint_residual(net: NeuralizedSVM, Z) -> np.ndarray:
    """|γ(Σ_d R^mid + pooled offsets) − (g − ΔH)| per row: the midpoint rule's exact bookkeeping."""
    m = net.moments(Z)
    R = midpoint_relevance(m)
    p_pos, p_neg = net.pooling(Z)
    lhs = net.gamma * (R.sum(axis=1) + net.pooled_offsets(Z))
    rhs = m.output - (entropy(p_pos) - entropy(p_neg))
    return np.abs(lhs - rhs)


def conservation_error(values: np.ndarray, output: np.ndarray) -> np.ndarray:
    """|Σ_d R_d − g| / max(1, |g|) per row."""
    return np.abs(values.sum(axis=1) - output) / np.maximum(1.0, np.abs(output))


def sign_agreement(model, X, expl) -> float:
    """Fraction of rows where the neuralized output agrees with the model's own decision."""
    classes = np.asarray(expl.positive)
    if _n_classes(model) == 2:
        from tub_knnlrp.neuralize import split_pipeline

        _, est, _ = split_pipeline(model)
        if hasattr(est, "decision_function") and type(est).__name__ == "SVC":
            f = np.asarray(model.decision_function(X))
            return float(np.mean(np.sign(expl.output) == np.sign(f)))
        return float(np.mean((expl.output > 0) == (np.asarray(expl.prediction) == classes)))
    return float(np.mean(expl.output > 0))


def _n_classes(model) -> int:
    return len(model.classes_)


def check_report(model, X, X_train=None, y_train=None, kappa=None, beta=None, with_intercept=True) -> dict:
    """Sign agreement and conservation figures for one model on rows X (original input space)."""
    base = NeuralizedExplainer(rule="midpoint", kappa=kappa, beta=beta, with_intercept=with_intercept)
    base.fit(model, X_train, y_train)
    net = base.network_
    report: dict = {"kind": net.kind, "classes": len(net.classes_), "rows": int(len(X))}
    if net.kind == "knn":
        kd = (net.k - 1) // 2
        for kap in sorted({0, kd if kappa is None else int(kappa)}):
            ex = NeuralizedExplainer(rule="midpoint", kappa=kap).fit(model, X_train, y_train)
            e = ex.explain(X)
            err = conservation_error(e.values, e.output)
            report[f"kappa{kap}"] = {"sign_agreement": sign_agreement(model, X, e),
                                     "conservation_max_rel_error": float(err.max())}
        report["k"] = int(net.k)
        return report
    e = base.explain(X)
    report["gamma"] = float(net.gamma)
    report["sign_agreement"] = sign_agreement(model, X, e)
    Z = transform_steps(base.steps_, np.asarray(X, dtype=np.float64))
    ident, mid = [], []
    pairs = {(int(a), int(b)) for a, b in zip(np.searchsorted(net.classes_, e.positive),
                                               np.searchsorted(net.classes_, e.negative))}
    for pos, neg in sorted(pairs):
        rows = np.flatnonzero((e.positive == net.classes_[pos]) & (e.negative == net.classes_[neg]))
        pair_net = net.network(pos, neg, with_intercept=with_intercept)
        ident.append(svm_identity_residual(pair_net, Z[rows]))
        mid.append(svm_midpoint_residual(pair_net, Z[rows]))
    report["identity_max_abs_residual"] = float(np.concatenate(ident).max())
    report["midpoint_bookkeeping_max_abs_residual"] = float(np.concatenate(mid).max())
    gap = conservation_error(e.values, e.output)
    report["midpoint_vs_g_median_rel_gap"] = float(np.median(gap))
    return report
