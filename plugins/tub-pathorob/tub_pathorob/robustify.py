"""Post-hoc robustification of features against medical-center effects (spec §2.5).

Estimators follow the scikit-learn contract: ``__init__`` stores options, ``fit(X, centers, covariates)``
returns ``self`` and sets attributes ending in ``_``, ``transform`` applies the stored estimates to
new rows (an unseen center is an error). ``save``/``load`` use safetensors + JSON, never pickle.

* :class:`CenterMeanAlignment` — x′ = x − μ_center + μ_all.
* :class:`ComBat` — parametric empirical-Bayes location/scale adjustment, Johnson, Li & Rabinovic,
  *Biostatistics* 8:118 (2007), in the form of ``neuroCombat`` (Fortin et al. 2018): center = batch,
  optional categorical covariates (e.g. the biological class) whose effect is preserved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tubcli.errors import TubError


def _as_str(a) -> np.ndarray:
    return np.asarray(a).astype(str)


class _CenterModel:
    method = ""
    # the saved arrays (attribute name without the trailing "_") and their shapes in C centers, D dimensions
    # and P covariate columns; those in positive_tensors are variances (> 0)
    tensor_shapes: dict[str, tuple[str, ...]] = {}
    positive_tensors: tuple[str, ...] = ()

    def _check_fitted(self):
        if not hasattr(self, "centers_"):
            raise TubError(f"{type(self).__name__} is not fitted; run `tub pathorob train` first")

    def _center_index(self, centers) -> np.ndarray:
        centers = _as_str(centers)
        lookup = {c: i for i, c in enumerate(self.centers_)}
        unseen = sorted({str(c) for c in centers if c not in lookup})
        if unseen:
            ood = getattr(self, "ood_centers_", None)
            why = (f"; its OOD rows ({', '.join(ood)}) were excluded at fit time, as the protocol keeps OOD "
                   "centers unseen" if ood and unseen[0] in ood else "")
            raise TubError(
                f"center {unseen[0]!r} was not seen when the {self.method} robustification was fitted "
                f"(fitted on {', '.join(self.centers_)}{why}); refit with `tub pathorob train --include-ood` "
                "(fits on all rows) or with features that include it, or robustify only the fitted centers' rows"
            )
        return np.array([lookup[c] for c in centers], dtype=np.int64)

    def fit_transform(self, X, centers, covariates=None):
        return self.fit(X, centers, covariates).transform(X, centers, covariates)

    # -- persistence -------------------------------------------------------------------------
    def _tensors(self) -> dict:
        return {name: getattr(self, name + "_") for name in self.tensor_shapes}

    def _config(self) -> dict:
        out = {"method": self.method, "centers": list(self.centers_)}
        if getattr(self, "ood_centers_", None):
            out["ood_centers_excluded"] = list(self.ood_centers_)
        return out

    def save(self, path: Path) -> tuple[Path, Path]:
        """``path.safetensors`` (arrays) + ``path.json`` (method, center names, levels)."""
        from safetensors.numpy import save_file
        from tubcli.io import atomic_path, write_json

        self._check_fitted()
        path = Path(path)
        st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
        with atomic_path(st) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in self._tensors().items()}, str(tmp))
        write_json(js, self._config())
        return st, js


class CenterMeanAlignment(_CenterModel):
    """Shift every center's mean onto the pooled mean: x′ = x − μ_center + μ_all."""

    method = "center-mean"
    tensor_shapes = {"mean": ("D",), "center_means": ("C", "D")}

    def fit(self, X, centers, covariates=None):
        X = np.asarray(X, dtype=np.float64)
        centers = _as_str(centers)
        self.centers_ = [str(c) for c in sorted(set(centers))]
        if len(self.centers_) < 2:
            raise TubError("center-mean alignment needs at least two medical centers")
        self.mean_ = X.mean(0)
        self.center_means_ = np.stack([X[centers == c].mean(0) for c in self.centers_])
        return self

    def transform(self, X, centers, covariates=None):
        self._check_fitted()
        X = np.asarray(X, dtype=np.float64)
        if X.shape[1] != self.mean_.shape[0]:
            raise TubError(f"features have {X.shape[1]} dimensions; the robustification was fitted on {self.mean_.shape[0]}")
        return X - self.center_means_[self._center_index(centers)] + self.mean_


class ComBat(_CenterModel):
    """Parametric empirical-Bayes ComBat (Johnson et al. 2007), batch = medical center.

    Parameters
    ----------
    tol : convergence threshold of the EB iteration (neuroCombat's ``conv``, 1e-4)
    max_iter : a bound on the EB iteration (neuroCombat has none)
    """

    method = "combat"
    tensor_shapes = {"grand_mean": ("D",), "var_pooled": ("D",), "gamma_star": ("C", "D"), "delta_star": ("C", "D"),
                     "beta_covariates": ("P", "D")}
    positive_tensors = ("var_pooled", "delta_star")

    def __init__(self, tol: float = 1e-4, max_iter: int = 10_000):
        self.tol = tol
        self.max_iter = max_iter

    def _design(self, centers_idx, covariates, fit: bool) -> np.ndarray:
        n = len(centers_idx)
        parts = [np.eye(len(self.centers_))[centers_idx]]
        covariates = covariates or {}
        if fit:
            self.covariate_levels_ = {name: sorted(set(_as_str(v))) for name, v in covariates.items()}
        elif set(covariates) != set(self.covariate_levels_):
            raise TubError(
                f"the robustification was fitted with covariates {sorted(self.covariate_levels_) or 'none'}; "
                f"give the same ({sorted(covariates) or 'none'})"
            )
        for name in sorted(self.covariate_levels_):
            levels = self.covariate_levels_[name]
            vals = _as_str(covariates[name])
            unknown = sorted(str(v) for v in set(vals) - set(levels))
            if unknown:
                raise TubError(f"covariate {name} has level {unknown[0]!r} not seen at fit time")
            onehot = (vals[:, None] == np.array(levels)[None, :]).astype(np.float64)
            parts.append(onehot[:, 1:])  # one-hot minus the first level, as neuroCombat
        M = np.hstack(parts) if len(parts) > 1 else parts[0]
        assert M.shape[0] == n
        return M

    def fit(self, X, centers, covariates: dict | None = None):
        """Estimate the standardisation and the EB batch effects (spec §2.5 steps 1–4)."""
        X = np.asarray(X, dtype=np.float64)
        centers = _as_str(centers)
        self.centers_ = [str(c) for c in sorted(set(centers))]
        nb = len(self.centers_)
        if nb < 2:
            raise TubError("ComBat needs at least two medical centers")
        cidx = np.searchsorted(np.array(self.centers_), centers)
        counts = np.bincount(cidx, minlength=nb)
        if counts.min() < 2:
            raise TubError(f"center {self.centers_[int(counts.argmin())]!r} has fewer than 2 rows; ComBat needs >= 2")
        M = self._design(cidx, covariates, fit=True)
        if np.linalg.matrix_rank(M) < M.shape[1]:
            raise TubError("the ComBat design is singular: a covariate level is confounded with a center; drop it")
        # step 1: B = (M'M)^-1 M'X; grand mean weighted by center sizes; pooled variance
        B = np.linalg.inv(M.T @ M) @ M.T @ X
        self.grand_mean_ = (counts / len(X)) @ B[:nb]
        self.var_pooled_ = ((X - M @ B) ** 2).mean(0)
        zero = self.var_pooled_ == 0
        if zero.any():  # neuroCombat substitutes a boolean median (a bug); use the median of the others
            self.var_pooled_[zero] = np.median(self.var_pooled_[~zero]) if (~zero).any() else 1.0
        self.beta_covariates_ = B[nb:]
        S = (X - self.grand_mean_ - M[:, nb:] @ self.beta_covariates_) / np.sqrt(self.var_pooled_)
        # step 2: per-center location and scale of the standardised data
        gamma_hat = np.stack([S[cidx == b].mean(0) for b in range(nb)])
        delta_hat = np.stack([S[cidx == b].var(0, ddof=1) for b in range(nb)])
        delta_hat[delta_hat == 0] = 1.0
        # step 3: hyper-priors per center (normal on gamma, inverse gamma on delta)
        gamma_bar = gamma_hat.mean(1)
        tau2 = gamma_hat.var(1, ddof=1)
        m, s2 = delta_hat.mean(1), delta_hat.var(1, ddof=1)
        a = (2 * s2 + m ** 2) / s2
        b = (m * s2 + m ** 3) / s2
        # step 4: EB posterior means by fixed-point iteration (Johnson et al. 2007, Eqs. 3.1-3.2)
        self.gamma_star_ = np.empty_like(gamma_hat)
        self.delta_star_ = np.empty_like(delta_hat)
        self.n_iter_ = []
        for c in range(nb):
            Sc = S[cidx == c]
            n = len(Sc)
            g_old, d_old = gamma_hat[c].copy(), delta_hat[c].copy()
            for it in range(1, self.max_iter + 1):
                g_new = (tau2[c] * n * gamma_hat[c] + d_old * gamma_bar[c]) / (tau2[c] * n + d_old)
                sum2 = ((Sc - g_new) ** 2).sum(0)
                d_new = (0.5 * sum2 + b[c]) / (n / 2.0 + a[c] - 1.0)
                change = max((np.abs(g_new - g_old) / g_old).max(), (np.abs(d_new - d_old) / d_old).max())
                g_old, d_old = g_new, d_new
                if change <= self.tol:
                    break
            else:
                raise TubError(f"ComBat did not converge for center {self.centers_[c]!r} in {self.max_iter} iterations",
                               exit_code=1)
            self.gamma_star_[c], self.delta_star_[c] = g_new, d_new
            self.n_iter_.append(it)
        return self

    def transform(self, X, centers, covariates: dict | None = None):
        """X* = ((S − γ*_c)/√δ*_c)·σ + α + mod (spec §2.5 step 5)."""
        self._check_fitted()
        X = np.asarray(X, dtype=np.float64)
        if X.shape[1] != self.grand_mean_.shape[0]:
            raise TubError(f"features have {X.shape[1]} dimensions; ComBat was fitted on {self.grand_mean_.shape[0]}")
        cidx = self._center_index(centers)
        M = self._design(cidx, covariates, fit=False)
        mod = M[:, len(self.centers_):] @ self.beta_covariates_
        sd = np.sqrt(self.var_pooled_)
        S = (X - self.grand_mean_ - mod) / sd
        S = (S - self.gamma_star_[cidx]) / np.sqrt(self.delta_star_[cidx])
        return S * sd + self.grand_mean_ + mod

    def _config(self):
        return super()._config() | {"covariate_levels": self.covariate_levels_, "tol": self.tol}


METHODS = {"combat": ComBat, "center-mean": CenterMeanAlignment}


def resolve_robustification(path: Path) -> Path:
    """The ``.safetensors`` of a robustification, given it (or its ``.json``), or the run directory of
    `tub pathorob train` (or that run's checkpoints folder)."""
    p = Path(path)
    name = "robustification.safetensors"
    for cand in ((p / name, p / "checkpoints" / name) if p.is_dir() else (p.with_suffix(".safetensors"),)):
        if cand.is_file():
            return cand
    raise TubError(f"no robustification found at {p}; pass the run directory of `tub pathorob train` "
                   f"or its checkpoints/{name}")


def _check_saved(cfg, arrays: dict, js: Path, st: Path) -> None:
    """One-line error unless the saved JSON and arrays describe a complete, consistent robustification."""

    def bad(what: str, where: Path = js):
        raise TubError(f"{where}: {what}; the file was changed or damaged, refit with `tub pathorob train`")

    if not isinstance(cfg, dict):
        bad("not a JSON object")
    if cfg.get("method") not in METHODS:
        bad(f"unknown robustification method {cfg.get('method')!r}")
    centers = cfg.get("centers")
    if not (isinstance(centers, list) and all(isinstance(c, str) for c in centers)
            and 2 <= len(centers) == len(set(centers))):
        bad("'centers' must list at least two distinct center names")
    levels = cfg.get("covariate_levels", {})
    if not (isinstance(levels, dict) and all(isinstance(v, list) and v and all(isinstance(x, str) for x in v)
                                             for v in levels.values())):
        bad("'covariate_levels' must map each covariate to its list of levels")
    tol = cfg.get("tol", 1e-4)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        bad("'tol' must be a positive number")
    sizes = {"C": len(centers), "P": sum(len(v) - 1 for v in levels.values())}
    for name, dims in METHODS[cfg["method"]].tensor_shapes.items():
        a = arrays.get(name)
        if a is None:
            bad(f"the array {name!r} is missing", st)
        if a.ndim != len(dims) or any(sizes.setdefault(d, n) != n for d, n in zip(dims, a.shape)):
            bad(f"the array {name!r} has shape {a.shape}, expected ({', '.join(str(sizes.get(d, d)) for d in dims)})"
                f" for {sizes['C']} centers", st)
        if not np.all(np.isfinite(a)):
            bad(f"the array {name!r} holds NaN or inf", st)
        if name in METHODS[cfg["method"]].positive_tensors and not np.all(a > 0):
            bad(f"the array {name!r} must be positive (variances)", st)


def load_robustification(path: Path):
    """Load a robustification saved by :meth:`save` (``.safetensors`` + ``.json``; or the run directory)."""
    from safetensors.numpy import load_file

    st = resolve_robustification(path)
    js = st.with_suffix(".json")
    if not js.is_file():
        raise TubError(f"robustification {st} has no {js.name} beside it; copy both files of `tub pathorob train`")
    try:
        cfg = json.loads(js.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TubError(f"{js}: cannot read robustification ({str(e).splitlines()[0]})") from None
    try:
        arrays = load_file(str(st))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise TubError(f"{st}: cannot read robustification ({str(e).splitlines()[0]})") from None
    _check_saved(cfg, arrays, js, st)
    model = METHODS[cfg["method"]]()
    for name in model.tensor_shapes:
        setattr(model, name + "_", np.asarray(arrays[name], dtype=np.float64))
    if isinstance(model, ComBat):
        model.tol = cfg.get("tol", model.tol)
        model.covariate_levels_ = cfg.get("covariate_levels", {})
    model.centers_ = list(cfg["centers"])
    ood = cfg.get("ood_centers_excluded", [])
    model.ood_centers_ = [str(c) for c in ood] if isinstance(ood, list) else []
    return model
