"""Baseline explanations that feature flipping compares kNN-LRP against (spec §2.7).

Every function returns relevances (n, d) *for the explained class c of each row* (larger = more
evidence for c), in model space, so that flipping sorts them descending without a sign flip.

* occlusion: F(x) − F(x with x_d ← baseline_d)
* random: i.i.d. N(0, 1) (seeded)
* gradient×input, integrated gradients (baseline b, 50 midpoint steps), sensitivity (∂f/∂x_d)²:
  from the analytic gradient of the SVM decision function (SVM only)
* variance prior: Var_train(x_d)
* centroid difference: (μ_c − μ_c')·(x − (μ_c + μ_c')/2), c' the competitor (our choice)
* neuralized IG: x ⊙ mean_{t=0..9} ∇g(x(1 − t/10)), pooling recomputed at each point
* exact Shapley values of F with the baseline as the absent value (2^d evaluations; d ≤ 16)
* KernelSHAP (optional, ``shap``): KernelExplainer(F, shap.kmeans(X_train, 10)), 500 samples
"""

from __future__ import annotations

import math

import numpy as np

from tub_knnlrp.scores import ClassScore


def occlusion(score: ClassScore, Z, c, baseline) -> np.ndarray:
    n, d = Z.shape
    f0 = score(Z, c)
    occluded = np.repeat(Z[:, None, :], d, axis=1)
    idx = np.arange(d)
    occluded[:, idx, idx] = baseline[None, :]
    f = score(occluded.reshape(n * d, d), np.repeat(c, d)).reshape(n, d)
    return f0[:, None] - f


def random_relevance(Z, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(Z.shape)


def variance_prior(Z, Z_train) -> np.ndarray:
    """R_d = Var_train(z_d), the same for every row. Variances equal to 9 significant digits count as equal:
    after a StandardScaler every one is 1 ± 1e-15, and the flipping order must not come from those last bits
    (ties keep the column order)."""
    v = Z_train.var(axis=0)
    top = float(np.max(np.abs(v))) if v.size else 0.0
    if top > 0:
        v = np.round(v / top, 9) * top
    return np.broadcast_to(v, Z.shape).copy()


def centroid_difference(Z, c, competitor, Z_train, y_train_idx) -> np.ndarray:
    mu = np.stack([Z_train[y_train_idx == k].mean(axis=0) for k in range(int(y_train_idx.max()) + 1)])
    a, b = mu[c], mu[competitor]
    return (a - b) * (Z - 0.5 * (a + b))


def svm_score_gradient(network, Z, c, competitor) -> np.ndarray:
    """∇_x f_{c,c'}(x) = Σ_i s_i α_i k(x, x_i)·(−2γ)(x − x_i) for each row's pair (c, c')."""
    grads = np.empty_like(Z)
    for cls, comp in {(int(a), int(b)) for a, b in zip(c, competitor)}:
        rows = np.flatnonzero((c == cls) & (competitor == comp))
        net = network.network(cls, comp, with_intercept=False)
        X = Z[rows]
        out = np.zeros_like(X)
        for pts, alpha, sign in ((net.points_pos, net.alpha_pos, 1.0), (net.points_neg, net.alpha_neg, -1.0)):
            diff = X[:, None, :] - pts[None]  # (r, m, d)
            k = np.exp(-net.gamma * np.einsum("rmd,rmd->rm", diff, diff)) * alpha[None]
            out += sign * (-2.0 * net.gamma) * np.einsum("rm,rmd->rd", k, diff)
        grads[rows] = out
    return grads


def gradient_x_input(network, Z, c, competitor, baseline) -> np.ndarray:
    return (Z - baseline) * svm_score_gradient(network, Z, c, competitor)


def integrated_gradients(network, Z, c, competitor, baseline, steps: int = 50) -> np.ndarray:
    total = np.zeros_like(Z)
    for t in range(steps):
        a = (t + 0.5) / steps
        total += svm_score_gradient(network, baseline + a * (Z - baseline), c, competitor)
    return (Z - baseline) * total / steps


def sensitivity(network, Z, c, competitor) -> np.ndarray:
    return svm_score_gradient(network, Z, c, competitor) ** 2


def neuralized_ig(explainer, Z, c, competitor, steps: int = 10) -> np.ndarray:
    """x ⊙ mean_t ∇g(x(1 − t/10)), t = 0 … 9 (left Riemann sum, zero baseline)."""
    total = np.zeros_like(Z)
    pairs = {(int(a), int(b)) for a, b in zip(c, competitor)}
    for t in range(steps):
        Xt = Z * (1.0 - t / steps)
        for cls, comp in pairs:
            rows = np.flatnonzero((c == cls) & (competitor == comp))
            total[rows] += explainer.network(cls, comp).gradient(Xt[rows])
    return Z * total / steps


def shapley_weights(d: int) -> np.ndarray:
    """w(|S|) = |S|! (d − |S| − 1)! / d! for |S| = 0 … d − 1."""
    return np.array([math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d) for s in range(d)])


def exact_shapley(value, Z, baseline, max_features: int = 16, batch_rows: int | None = None) -> np.ndarray:
    """Exact Shapley values of ``value(X_masked, row_index)`` by enumerating all 2^d coalitions.

    ``value`` maps (m, d) inputs and the row index of each input to (m,) outputs; a coalition S
    keeps x_S and sets the rest to ``baseline``.
    """
    n, d = Z.shape
    if d > max_features:
        raise ValueError(f"exact Shapley values need 2^d evaluations; d={d} exceeds {max_features}")
    codes = np.arange(2**d)
    masks = ((codes[:, None] >> np.arange(d)[None, :]) & 1).astype(bool)  # (2^d, d)
    size = masks.sum(axis=1)
    w = shapley_weights(d)
    phi = np.zeros((n, d))
    batch_rows = batch_rows or max(1, 200_000 // 2**d)
    for s in range(0, n, batch_rows):
        rows = np.arange(s, min(n, s + batch_rows))
        X = np.where(masks[None], Z[rows, None, :], baseline[None, None, :])  # (r, 2^d, d)
        v = value(X.reshape(-1, d), np.repeat(rows, 2**d)).reshape(len(rows), 2**d)
        for j in range(d):
            without = codes[~masks[:, j]]
            phi[rows, j] = (v[:, without | (1 << j)] - v[:, without]) @ w[size[without]]
    return phi


def kernel_shap(score: ClassScore, Z, c, competitor, Z_train, nsamples: int = 500, n_background: int = 10,
                seed: int = 0) -> np.ndarray:
    """KernelSHAP of the soft score for each row's (c, c') pair (needs ``pip install shap``).

    For the kNN the explained function is p_c − p_c' with c' the strongest competitor at x (the
    same as the flipping score for binary models); for the SVM it is f_{c,c'}.
    """
    try:
        import shap
    except ImportError as exc:
        raise ImportError("KernelSHAP needs shap: pip install shap") from exc
    background = shap.kmeans(Z_train, min(n_background, len(Z_train)))  # a tiny training set: every row
    phi = np.zeros_like(Z)
    for cls, comp in sorted({(int(a), int(b)) for a, b in zip(c, competitor)}):
        rows = np.flatnonzero((c == cls) & (competitor == comp))
        if score.network.kind == "knn":
            def f(X, cls=cls, comp=comp):
                P = score.estimator.predict_proba(X)
                return P[:, cls] - P[:, comp]
        else:
            net = score.network.network(cls, comp, with_intercept=False)
            f = net.decision_function
        explainer = shap.KernelExplainer(f, background)
        # shap samples coalitions with numpy's global generator: seed it, then restore the caller's state
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            vals = explainer.shap_values(Z[rows], nsamples=nsamples, silent=True)
        finally:
            np.random.set_state(state)
        phi[rows] = np.asarray(vals).reshape(len(rows), -1)
    return phi
