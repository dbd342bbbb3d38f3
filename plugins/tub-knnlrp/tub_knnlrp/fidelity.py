"""Faithfulness checks of the neuralization: sign agreement, conservation, the SVM identity (§2.2–2.3, §6).

* **sign agreement**: binary, sign(g) against the model's ``predict`` (kNN) or
  sign(``decision_function``) (SVM); multiclass, the fraction of rows whose predicted class wins
  every pairwise network (g_c > 0), which need not be 100% (spec §2.4).
* **vote ties** (multiclass kNN): rows where several classes share the most votes among the k
  neighbours. scikit-learn then predicts the tied class listed first in ``classes_``; the pairwise
  networks know nothing of that tie-break (each one compares its two classes on their own k nearest
  points, which reach past the tied neighbourhood), so g_c may be negative there. At κ = 0, g_c > 0
  is guaranteed on rows where the predicted class holds a majority, ≥ (k + 1)/2 of the k votes (every
  row of a binary model): its k_d nearest points are then also its k_d nearest against each single
  competitor. Rows with a plurality but no majority can disagree without a tie. ``check`` reports
  both counts and the sign agreement without ties and on majority rows (1.0 at κ = 0).
* **distance ties** (kNN): rows with g = 0 exactly: the deciding neighbours of the two classes are
  equally far (common on integer or one-hot features) and scikit-learn breaks the tie by the training
  rows' order, which the network cannot know; ``check`` reports their count and the sign agreement
  without them.
* **pairwise vote ties** (multiclass SVM, one-vs-one): rows where several classes win the most pairwise
  votes; libsvm predicts the first of them in ``classes_``, which has lost one of its pairs, so g_c < 0.
  Rows whose predicted class wins by votes but loses one pair disagree the same way without a tie.
* **conservation** (kNN, midpoint rule): |Σ_d R_d − g_κ| / max(1, |g_κ|), exact for every κ.
* **SVM identity** (β = γ): γ(Σp⁻z⁻ − Σp⁺z⁺) = g − (H(p⁺) − H(p⁻)); the midpoint relevances sum
  to Σp⁻z⁻ − Σp⁺z⁺ minus the pooled constants (log-α terms and the intercept), so
  γ(Σ_d R^mid + offsets) − g + H(p⁺) − H(p⁻) must vanish.
"""

from __future__ import annotations

import numpy as np

from tub_knnlrp.explanation import NeuralizedExplainer
from tub_knnlrp.networks import NeuralizedSVM, row_blocks
from tub_knnlrp.neuralize import transform_steps
from tub_knnlrp.rules import midpoint_relevance


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy per row (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)


def svm_identity_residual(net: NeuralizedSVM, Z) -> np.ndarray:
    """|γ(Σp⁻z⁻ − Σp⁺z⁺) − g + H(p⁺) − H(p⁻)| per row, at β = γ (row blocks, units computed once each)."""
    Z = np.asarray(Z, dtype=np.float64)
    out = np.empty(len(Z))
    for sl in row_blocks(len(Z), net.block_rows(6)):
        z_pos, z_neg = net.units(Z[sl])
        p_pos, p_neg = net._pool(z_pos, z_neg, None)
        lhs = net.gamma * ((p_neg * z_neg).sum(axis=1) - (p_pos * z_pos).sum(axis=1))
        rhs = net._output(z_pos, z_neg) - (entropy(p_pos) - entropy(p_neg))
        out[sl] = np.abs(lhs - rhs)
    return out


def svm_midpoint_residual(net: NeuralizedSVM, Z) -> np.ndarray:
    """|γ(Σ_d R^mid + pooled offsets) − (g − ΔH)| per row: the midpoint rule's exact bookkeeping (row blocks)."""
    Z = np.asarray(Z, dtype=np.float64)
    out = np.empty(len(Z))
    for sl in row_blocks(len(Z), net.block_rows(6)):
        Zb = Z[sl]
        m = net.moments(Zb)
        R = midpoint_relevance(m)
        p_pos, p_neg = net.pooling(Zb)
        lhs = net.gamma * (R.sum(axis=1) + net.pooled_offsets(Zb))
        rhs = m.output - (entropy(p_pos) - entropy(p_neg))
        out[sl] = np.abs(lhs - rhs)
    return out


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


def vote_structure(model, X) -> tuple[np.ndarray, np.ndarray]:
    """Masks (tie, majority) of a uniform kNN's vote, from predict_proba = votes / k: several classes
    share the top vote; the top class holds more than half of the votes."""
    P = np.asarray(model.predict_proba(X))
    top = P.max(axis=1)
    return (P == top[:, None]).sum(axis=1) > 1, top > 0.5


def pairwise_vote_ties(explainer: NeuralizedExplainer, Z) -> np.ndarray:
    """Mask of rows (model space Z) where several classes share the most one-vs-one votes of a multiclass
    SVM; each pair's vote is the sign of its network's g, which is the sign of its decision function."""
    n_classes = len(explainer.network_.classes_)
    votes = np.zeros((len(Z), n_classes), dtype=int)
    for i in range(n_classes):
        for j in range(i + 1, n_classes):
            wins = explainer.network(i, j).forward(Z) > 0
            votes[:, i] += wins
            votes[:, j] += ~wins
    return (votes == votes.max(axis=1, keepdims=True)).sum(axis=1) > 1


def _take(X, mask):
    return X.iloc[mask] if hasattr(X, "iloc") else np.atleast_2d(np.asarray(X))[mask]


def _rows(e, mask):
    """The explanation restricted to the rows of ``mask`` (what sign_agreement reads)."""
    from dataclasses import replace

    return replace(e, values=e.values[mask], output=e.output[mask], prediction=np.asarray(e.prediction)[mask],
                   positive=np.asarray(e.positive)[mask], negative=np.asarray(e.negative)[mask], data=e.data[mask])


def _share_positive(g: np.ndarray) -> float | None:
    return float(np.mean(g > 0)) if len(g) else None


def check_report(model, X, X_train=None, y_train=None, kappa=None, beta=None, with_intercept=True) -> dict:
    """Sign agreement and conservation figures for one model on rows X (original input space)."""
    base = NeuralizedExplainer(rule="midpoint", kappa=kappa, beta=beta, with_intercept=with_intercept)
    base.fit(model, X_train, y_train)
    net = base.network_
    report: dict = {"kind": net.kind, "classes": len(net.classes_), "rows": int(len(X))}
    if net.kind == "knn":
        kd = (net.k - 1) // 2
        multiclass = len(net.classes_) > 2
        if multiclass:
            ties, majority = vote_structure(model, X)
            report.update(vote_ties=int(ties.sum()), no_majority=int((~majority).sum()))
        for kap in sorted({0, kd if kappa is None else int(kappa)}):
            ex = NeuralizedExplainer(rule="midpoint", kappa=kap).fit(model, X_train, y_train)
            e = ex.explain(X)
            err = conservation_error(e.values, e.output)
            entry = {"sign_agreement": sign_agreement(model, X, e), "conservation_max_rel_error": float(err.max())}
            tied = e.output == 0
            entry["distance_ties"] = int(tied.sum())
            entry["sign_agreement_without_distance_ties"] = (sign_agreement(model, _take(X, ~tied), _rows(e, ~tied))
                                                            if (~tied).any() else None)
            if multiclass:
                entry["sign_agreement_without_ties"] = _share_positive(e.output[~ties])
                entry["sign_agreement_majority"] = _share_positive(e.output[majority])
            report[f"kappa{kap}"] = entry
        report["k"] = int(net.k)
        return report
    e = base.explain(X)
    report["gamma"] = float(net.gamma)
    report["sign_agreement"] = sign_agreement(model, X, e)
    Z = transform_steps(base.steps_, X)
    if len(net.classes_) > 2:
        ties = pairwise_vote_ties(base, Z)
        report["vote_ties"] = int(ties.sum())
        report["sign_agreement_without_ties"] = _share_positive(e.output[~ties])
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
