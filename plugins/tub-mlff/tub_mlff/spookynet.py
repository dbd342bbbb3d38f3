"""SpookyNet: a force field with electronic degrees of freedom and nonlocal effects.

O. T. Unke, S. Chmiela, M. Gastegger, K. T. Schuett, H. E. Sauceda, K.-R. Mueller,
*SpookyNet: Learning force fields with electronic degrees of freedom and nonlocal effects*,
Nat. Commun. 12, 7273 (2021), arXiv:2105.00304. Equation numbers below refer to the paper's
Methods; the exact forms follow tub's spec (specs/mlff.md §2), written from the formulas.

Energy E = sum_i (e_i + e_rep,i + e_ele,i + e_vdw,i); forces -dE/dR and the stress
(1/V) dE/d(strain) come from autograd (:mod:`tub_mlff.properties`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .elements import ZMAX, electron_configuration_table
from .layers import (ACTIVATIONS, ResidualMLP, ResidualStack, cutoff_function, orthogonal_, parallel_residual_mlps,
                     scatter_sum, softplus_inverse)
from .physical_terms import D4Dispersion, Electrostatics, ZBLRepulsion, _split_half

DEFAULT_CUTOFF = 5.291772105638412  # 10 bohr in Angstrom


@dataclass
class SpookyNetConfig:
    """Architecture hyper-parameters (defaults = the paper's/reference's defaults)."""

    num_features: int = 64
    num_basis_functions: int = 16
    num_modules: int = 3
    cutoff: float = DEFAULT_CUTOFF
    lr_cutoff: float | None = None
    use_zbl_repulsion: bool = True
    use_electrostatics: bool = True
    use_d4_dispersion: bool = True
    compute_d4_atomic: bool = False
    module_keep_prob: float = 1.0
    zmax: int = ZMAX
    num_random_features: int | None = None  # FAVOR+ features of the attention; None = num_features
    # the reference's further options (its defaults = these): activation 'swish' | 'ssp'; radial basis
    # 'exp-bernstein' | 'exp-gaussian' | 'bernstein' | 'gaussian' | 'sinc' (exp_weighting: the exp-
    # variants times e^{-alpha r}); irreducible (5) or Cartesian (6) d-type angular functions; the
    # charge/spin embedding of Eq. 4-6 or the reference's older nonlinear (softmax) embedding
    activation: str = "swish"
    basis_functions: str = "exp-bernstein"
    exp_weighting: bool = True
    use_irreps: bool = True
    use_nonlinear_embedding: bool = False
    num_residual: dict = field(default_factory=lambda: {
        k: 1 for k in ("electron", "pre", "local_x", "local_s", "local_p", "local_d", "local",
                       "nonlocal_q", "nonlocal_k", "nonlocal_v", "post", "output")})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpookyNetConfig":
        d = dict(d)
        nr = cls().num_residual
        nr.update(d.pop("num_residual", {}) or {})
        return cls(num_residual=nr, **d)


class NuclearEmbedding(nn.Module):
    """e_Z = E[Z] + M c(Z) (Eq. 3): free element vectors plus a map of the electron configuration."""

    def __init__(self, num_features: int, zmax: int = ZMAX) -> None:
        super().__init__()
        self.register_buffer("electron_config", torch.tensor(electron_configuration_table(zmax)))
        self.element = nn.Parameter(torch.zeros(zmax, num_features))
        self.config_map = nn.Linear(20, num_features, bias=False)
        nn.init.zeros_(self.config_map.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # recomputed on every call: no cached table that could go stale between train/eval
        return self.element.index_select(0, z) + self.config_map(self.electron_config[z].to(self.element.dtype))


class ElectronicEmbedding(nn.Module):
    """Charge or spin embedding (Eq. 4-6): attention of atoms onto the molecule's Q or S.

    q_i = W_q e_Z,i + b; k = W_k e/max(e,1); v = W_v e; a_i = softplus(q_i.k / sqrt(F));
    out_i = ResMLP((a_i / (sum_mol a + eps)) v), with e = [relu(Q), relu(-Q)] or |S|.
    """

    def __init__(self, num_features: int, num_residual: int, is_charge: bool, activation: str = "swish") -> None:
        super().__init__()
        self.is_charge = is_charge
        n_in = 2 if is_charge else 1
        self.query = nn.Linear(num_features, num_features)
        self.key = nn.Linear(n_in, num_features, bias=False)
        self.value = nn.Linear(n_in, num_features, bias=False)
        orthogonal_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        orthogonal_(self.key.weight)
        orthogonal_(self.value.weight)
        self.mlp = ResidualMLP(num_features, num_residual, bias=False, zero=True, activation=activation)

    def forward(self, x: torch.Tensor, E: torch.Tensor, batch_seg: torch.Tensor, num_batch: int,
                eps: float = 1e-8) -> torch.Tensor:
        if self.is_charge:
            e = F.relu(torch.stack([E, -E], dim=-1))
        else:
            e = torch.abs(E).unsqueeze(-1)
        k = self.key(e / torch.clamp(e, min=1.0)).index_select(0, batch_seg)
        v = self.value(e).index_select(0, batch_seg)
        q = self.query(x)
        a = F.softplus((q * k).sum(-1) / math.sqrt(k.shape[-1]))
        anorm = scatter_sum(a, batch_seg, num_batch).index_select(0, batch_seg)
        return self.mlp((a / (anorm + eps)).unsqueeze(-1) * v)


class NonlinearElectronicEmbedding(nn.Module):
    """The reference's older charge/spin embedding (``use_nonlinear_embedding=True``): softmax attention.

    k = ResMLP_k(w_k E + b_k), v = ResMLP_v(w_v E) (E = Q or S, signed); q_i = W_q e_Z,i;
    a_i = exp((q_i.k - m) / sqrt(F)); out_i = (a_i / (sum_mol a + eps)) v. The shift m is the
    molecule's largest q.k, as in the reference also counting 0 when the batch holds other molecules
    (the reference masks them with zeros); it cancels up to eps.
    """

    def __init__(self, num_features: int, num_residual: int, activation: str = "swish") -> None:
        super().__init__()
        self.query = nn.Linear(num_features, num_features, bias=False)
        self.key = nn.Linear(1, num_features)
        self.key_mlp = ResidualMLP(num_features, num_residual, zero=True, activation=activation)
        self.value = nn.Linear(1, num_features, bias=False)
        self.value_mlp = ResidualMLP(num_features, num_residual, bias=False, zero=True, activation=activation)
        orthogonal_(self.query.weight)
        orthogonal_(self.key.weight)
        nn.init.zeros_(self.key.bias)
        orthogonal_(self.value.weight)

    def forward(self, x: torch.Tensor, E: torch.Tensor, batch_seg: torch.Tensor, num_batch: int,
                eps: float = 1e-8) -> torch.Tensor:
        e = E.unsqueeze(-1)
        k = self.key_mlp(self.key(e)).index_select(0, batch_seg)
        v = self.value_mlp(self.value(e)).index_select(0, batch_seg)
        dot = (self.query(x) * k).sum(-1)
        if num_batch == 1:
            shift = dot.max()
        else:
            segmax = dot.new_full((num_batch,), -torch.inf).scatter_reduce(0, batch_seg, dot, reduce="amax")
            others = torch.bincount(batch_seg, minlength=num_batch) < dot.shape[0]
            shift = torch.where(others, segmax.clamp(min=0.0), segmax).index_select(0, batch_seg)
        a = torch.exp((dot - shift) / math.sqrt(k.shape[-1]))
        anorm = scatter_sum(a, batch_seg, num_batch).index_select(0, batch_seg)
        return (a / (anorm + eps)).unsqueeze(-1) * v


class ExponentialBernstein(nn.Module):
    """b_v(r) = C(K-1,v) e^{-a r (K-1-v)} (1 - e^{-a r})^v f_c(r) [e^{-a r}] (Eq. 7), in log space;
    the last factor only with ``exp_weighting`` (the default)."""

    def __init__(self, num_basis_functions: int, alpha: float = 0.9448630629184640,
                 exp_weighting: bool = True) -> None:
        super().__init__()
        K = num_basis_functions
        v = np.arange(K, dtype=np.float64)
        logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, K)))])
        logc = logfact[K - 1] - logfact[v.astype(int)] - logfact[(K - 1 - v).astype(int)]
        self.register_buffer("logc", torch.tensor(logc))
        self.register_buffer("n", torch.tensor(K - 1 - v))
        self.register_buffer("v", torch.tensor(v))
        self.alpha_raw = nn.Parameter(torch.tensor(softplus_inverse(alpha), dtype=torch.float64))
        self.exp_weighting = exp_weighting

    def forward(self, r: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
        ar = -F.softplus(self.alpha_raw) * r.view(-1, 1)
        x = self.logc + self.n * ar + self.v * torch.log(-torch.expm1(ar))
        rbf = fc.view(-1, 1) * torch.exp(x)
        return rbf * torch.exp(ar) if self.exp_weighting else rbf


class ExponentialGaussian(nn.Module):
    """g_k(r) = exp(-K (e^{-a r} - mu_k)^2) f_c(r) [e^{-a r}], mu_k = 1 - k/(K-1) (reference 'exp-gaussian')."""

    def __init__(self, num_basis_functions: int, alpha: float = 0.9448630629184640,
                 exp_weighting: bool = True) -> None:
        super().__init__()
        K = num_basis_functions
        self.register_buffer("center", torch.linspace(1.0, 0.0, K, dtype=torch.float64))
        self.register_buffer("width", torch.tensor(float(K), dtype=torch.float64))
        self.alpha_raw = nn.Parameter(torch.tensor(softplus_inverse(alpha), dtype=torch.float64))
        self.exp_weighting = exp_weighting

    def forward(self, r: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
        y = torch.exp(-F.softplus(self.alpha_raw) * r.view(-1, 1))
        rbf = fc.view(-1, 1) * torch.exp(-self.width * (y - self.center) ** 2)
        return rbf * y if self.exp_weighting else rbf


class Gaussian(nn.Module):
    """g_k(r) = exp(-(K/r_c) (r - mu_k)^2) f_c(r), mu_k = k r_c/(K-1) (reference 'gaussian'; the width
    is K/r_c as the reference has it, not its square)."""

    def __init__(self, num_basis_functions: int, cutoff: float) -> None:
        super().__init__()
        K = num_basis_functions
        self.register_buffer("cutoff", torch.tensor(float(cutoff), dtype=torch.float64))
        self.register_buffer("center", torch.linspace(0.0, float(cutoff), K, dtype=torch.float64))
        self.register_buffer("width", torch.tensor(K / float(cutoff), dtype=torch.float64))

    def forward(self, r: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
        return fc.view(-1, 1) * torch.exp(-self.width * (r.view(-1, 1) - self.center) ** 2)


class Bernstein(nn.Module):
    """b_v(r) = C(K-1,v) x^{K-1-v} (1 - x)^v f_c(r), x = r/r_c (reference 'bernstein'), in log space."""

    def __init__(self, num_basis_functions: int, cutoff: float) -> None:
        super().__init__()
        K = num_basis_functions
        v = np.arange(K, dtype=np.float64)
        logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, K)))])
        logc = logfact[K - 1] - logfact[v.astype(int)] - logfact[(K - 1 - v).astype(int)]
        self.register_buffer("cutoff", torch.tensor(float(cutoff), dtype=torch.float64))
        self.register_buffer("logc", torch.tensor(logc))
        self.register_buffer("n", torch.tensor(K - 1 - v))
        self.register_buffer("v", torch.tensor(v))

    def forward(self, r: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
        x = r.view(-1, 1) / self.cutoff
        x = torch.log(torch.where(x < 1.0, x, torch.full_like(x, 0.5)))  # f_c = 0 there; no log(0)
        return fc.view(-1, 1) * torch.exp(self.logc + self.n * x + self.v * torch.log(-torch.expm1(x)))


class Sinc(nn.Module):
    """g_k(r) = sinc((k+1) r / r_c) f_c(r), sinc(x) = sin(pi x)/(pi x) (reference 'sinc')."""

    def __init__(self, num_basis_functions: int, cutoff: float) -> None:
        super().__init__()
        K = num_basis_functions
        self.register_buffer("factor", torch.arange(1, K + 1, dtype=torch.float64) / float(cutoff))

    def forward(self, r: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
        return fc.view(-1, 1) * torch.sinc(self.factor * r.view(-1, 1))


BASIS_FUNCTIONS = ("exp-bernstein", "exp-gaussian", "bernstein", "gaussian", "sinc")
ACTIVATION_NAMES = tuple(ACTIVATIONS)  # the activations layers.py implements


def radial_basis(cfg: SpookyNetConfig) -> nn.Module:
    """The radial basis module named by ``cfg.basis_functions`` (buffer names as in the reference)."""
    K, name = cfg.num_basis_functions, cfg.basis_functions
    if name == "exp-bernstein":
        return ExponentialBernstein(K, exp_weighting=cfg.exp_weighting)
    if name == "exp-gaussian":
        return ExponentialGaussian(K, exp_weighting=cfg.exp_weighting)
    if name == "bernstein":
        return Bernstein(K, cfg.cutoff)
    if name == "gaussian":
        return Gaussian(K, cfg.cutoff)
    if name == "sinc":
        return Sinc(K, cfg.cutoff)
    raise ValueError(f"basis_functions must be one of {', '.join(BASIS_FUNCTIONS)}, not {name!r}")


class LocalInteraction(nn.Module):
    """Local s/p/d message passing (Eq. 8-10).

    s_i = ResMLP_x(x_i) + sum_j g_s o ResMLP_s(x_j); p_i = sum_j g_p o ResMLP_p(x_j) [3,F];
    d_i likewise [5,F]; l_i = ResMLP_zero(s_i + sum_m P_a o P_b + sum_m D_a o D_b).
    """

    def __init__(self, F_: int, K: int, nr: dict, activation: str = "swish") -> None:
        super().__init__()
        act = activation
        self.filter_s = nn.Linear(K, F_, bias=False)
        self.filter_p = nn.Linear(K, F_, bias=False)
        self.filter_d = nn.Linear(K, F_, bias=False)
        self.mlp_x = ResidualMLP(F_, nr["local_x"], activation=act)
        self.mlp_s = ResidualMLP(F_, nr["local_s"], activation=act)
        self.mlp_p = ResidualMLP(F_, nr["local_p"], activation=act)
        self.mlp_d = ResidualMLP(F_, nr["local_d"], activation=act)
        self.proj_p = nn.Linear(F_, 2 * F_, bias=False)
        self.proj_d = nn.Linear(F_, 2 * F_, bias=False)
        self.mlp_out = ResidualMLP(F_, nr["local"], zero=True, activation=act)
        for lin in (self.filter_s, self.filter_p, self.filter_d, self.proj_p, self.proj_d):
            orthogonal_(lin.weight)

    def forward(self, x, layout: "PairLayout", branches=None):
        """``branches`` = (ResMLP_s(x), ResMLP_p(x), ResMLP_d(x), ResMLP_x(x)) if already computed."""
        n, F_ = x.shape
        xs, xp, xd, xx = branches if branches is not None else \
            [m(x) for m in (self.mlp_s, self.mlp_p, self.mlp_d, self.mlp_x)]
        # everything per pair lives in the padded [atom, neighbour slot] layout built once per
        # call (PairLayout): per branch one gather of the neighbour features and the radial filter,
        # then s as a sum over slots and p/d as batched matmuls with the angular factors (never
        # materialising [P, 3|5, F] outer products; no scatters, no slices of a wide tensor)
        k = layout.kmax

        def message(y, lin):
            return ((layout.rbf @ lin.weight.T) * y.index_select(0, layout.j)).view(n, k, F_)

        s = xx + message(xs, self.filter_s).sum(1)
        p = torch.bmm(layout.ang_p, message(xp, self.filter_p))
        d = torch.bmm(layout.ang_d, message(xd, self.filter_d))
        pa, pb = torch.split(self.proj_p(p), F_, dim=-1)
        da, db = torch.split(self.proj_d(d), F_, dim=-1)
        return self.mlp_out(s + (pa * pb).sum(-2) + (da * db).sum(-2))


class PairLayout:
    """Short-range pairs laid out as [atom i, neighbour slot] (padded to the largest neighbour
    count), built once per forward call and shared by all modules.

    ``j`` [n*kmax] the neighbour atom of each slot (0 in empty slots), ``rbf`` [n*kmax, K] the
    radial basis (0 in empty slots, so they contribute nothing), ``ang_p`` [n, 3, kmax] and
    ``ang_d`` [n, 5 (irreps) or 6 (Cartesian), kmax] the angular factors. Same sums as scattering over pairs, in another
    order; every op is twice differentiable (forces in the training loss).
    """

    def __init__(self, idx_i, idx_j, rbf, pij, dij, n: int) -> None:
        P = idx_i.shape[0]
        slot, kmax = neighbour_slots(idx_i, n)
        kmax = max(kmax, 1)
        inv = torch.full((n * kmax,), P, dtype=torch.long, device=idx_i.device)
        inv[idx_i * kmax + slot] = torch.arange(P, device=idx_i.device)
        self.kmax = kmax
        self.j = torch.cat([idx_j, idx_j.new_zeros(1)]).index_select(0, inv)
        self.rbf = torch.cat([rbf, rbf.new_zeros(1, rbf.shape[1])]).index_select(0, inv)
        width = 3 + dij.shape[1]
        ang = torch.cat([torch.cat([pij, dij], dim=-1), pij.new_zeros(1, width)]).index_select(0, inv)
        ang = ang.view(n, kmax, width).transpose(1, 2)
        self.ang_p, self.ang_d = ang[:, :3], ang[:, 3:]


def neighbour_slots(idx_i: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Position of each pair among its centre atom's pairs, and the largest neighbour count."""
    P = idx_i.shape[0]
    if P == 0:
        return idx_i, 0
    counts = torch.bincount(idx_i, minlength=n)
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(idx_i, stable=True)
    slot = torch.empty_like(idx_i)
    slot[order] = torch.arange(P, device=idx_i.device) - start[idx_i[order]]
    return slot, int(counts.max())


def random_features(num_features: int, num_random: int, generator: np.random.Generator) -> np.ndarray:
    """omega [F, m] for FAVOR+ (Choromanski et al. 2021): orthogonal Gaussian random features.

    Rows are stacked transposed QR factors of F x F Gaussian blocks, rescaled by the norms of
    fresh Gaussian vectors; returned transposed so that U = X omega. Seeded, never global RNG.
    """
    from .layers import single_thread_blas

    blocks = []
    nblocks, rest = divmod(num_random, num_features)
    with single_thread_blas():
        for _ in range(nblocks):
            qm, _ = np.linalg.qr(generator.normal(size=(num_features, num_features)))
            blocks.append(qm.T)
        if rest:
            qm, _ = np.linalg.qr(generator.normal(size=(num_features, num_features)))
            blocks.append(qm.T[:rest])
    norms = np.linalg.norm(generator.normal(size=(num_random, num_features)), axis=1, keepdims=True)
    return (norms * np.vstack(blocks)).T


class NonlocalInteraction(nn.Module):
    """Linear-scaling self-attention over all atoms of a molecule (Eq. 11; Performer FAVOR+).

    phi(X) = (exp(X omega / d^1/4 - |X|^2/(2 sqrt d) - max) + 1e-4) / sqrt(m), the max taken per
    row for queries and over the whole molecule for keys;
    out_i = phi(q_i) sum_j phi(k_j)^T v_j / (phi(q_i) . sum_j phi(k_j) + 1e-8).
    """

    def __init__(self, F_: int, nr: dict, seed: int = 0, num_random: int | None = None,
                 activation: str = "swish") -> None:
        super().__init__()
        self.mlp_q = ResidualMLP(F_, nr["nonlocal_q"], zero=True, activation=activation)
        self.mlp_k = ResidualMLP(F_, nr["nonlocal_k"], zero=True, activation=activation)
        self.mlp_v = ResidualMLP(F_, nr["nonlocal_v"], zero=True, activation=activation)
        omega = random_features(F_, num_random or F_, np.random.default_rng(seed))
        self.register_buffer("omega", torch.tensor(omega, dtype=torch.float64))
        self.keep_attention = False
        self.last_phi: tuple[torch.Tensor, torch.Tensor] | None = None

    def _phi(self, X: torch.Tensor, is_query: bool, batch_seg: torch.Tensor, num_batch: int,
             eps: float = 1e-4) -> torch.Tensor:
        d = X.shape[-1]
        m = self.omega.shape[-1]
        U = (X / d ** 0.25) @ self.omega.to(X.dtype)
        h = (X ** 2).sum(-1, keepdim=True) / (2 * d ** 0.5)
        if is_query:
            mx = U.max(dim=-1, keepdim=True).values
        elif num_batch == 1:
            mx = U.max()
        else:
            rowmax = U.max(dim=-1).values
            segmax = rowmax.new_full((num_batch,), -torch.inf).scatter_reduce(
                0, batch_seg, rowmax, reduce="amax", include_self=True)
            mx = segmax.index_select(0, batch_seg).unsqueeze(-1)
        return (torch.exp(U - h - mx) + eps) / math.sqrt(m)

    def forward(self, x: torch.Tensor, batch_seg: torch.Tensor, num_batch: int, eps: float = 1e-8,
                qkv=None):
        """``qkv`` = (ResMLP_q(x), ResMLP_k(x), ResMLP_v(x)) if already computed."""
        xq, xk, v = qkv if qkv is not None else [m(x) for m in (self.mlp_q, self.mlp_k, self.mlp_v)]
        q = self._phi(xq, True, batch_seg, num_batch)
        k = self._phi(xk, False, batch_seg, num_batch)
        if self.keep_attention:
            self.last_phi = (q.detach(), k.detach())
        if num_batch == 1:
            norm = q @ k.sum(0) + eps
            return (q @ (k.T @ v)) / norm.unsqueeze(-1)
        kv = scatter_sum(k.unsqueeze(-1) * v.unsqueeze(-2), batch_seg, num_batch)  # [B, m, F]
        ksum = scatter_sum(k, batch_seg, num_batch)  # [B, m]
        num = torch.einsum("nm,nmf->nf", q, kv.index_select(0, batch_seg))
        norm = (q * ksum.index_select(0, batch_seg)).sum(-1, keepdim=True) + eps
        return num / norm


class InteractionModule(nn.Module):
    """One SpookyNet module (Eq. 12): x = R_post(R_pre(x) + l + n); output y = ResMLP_out(x)."""

    def __init__(self, F_: int, K: int, nr: dict, seed: int = 0, num_random: int | None = None,
                 activation: str = "swish") -> None:
        super().__init__()
        self.pre = ResidualStack(F_, nr["pre"], activation=activation)
        self.local = LocalInteraction(F_, K, nr, activation)
        self.nonlocal_ = NonlocalInteraction(F_, nr, seed, num_random, activation)
        self.post = ResidualStack(F_, nr["post"], activation=activation)
        self.out = ResidualMLP(F_, nr["output"], activation=activation)

    def forward(self, x, layout: PairLayout, batch_seg, num_batch):
        x = self.pre(x)
        # the seven ResMLPs that read x (local s/p/d/x, attention q/k/v) as one batched pass
        loc, nl = self.local, self.nonlocal_
        ys = parallel_residual_mlps([loc.mlp_s, loc.mlp_p, loc.mlp_d, loc.mlp_x, nl.mlp_q, nl.mlp_k, nl.mlp_v], x)
        l = self.local(x, layout, branches=ys[:4])
        n = self.nonlocal_(x, batch_seg, num_batch, qkv=ys[4:])
        x = self.post(x + l + n)
        return x, self.out(x)


def half_pair_mask(idx_i: torch.Tensor, idx_j: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """Select each unordered pair (i, j, image) once from a list that has both directions."""
    if offsets is None:
        return idx_i < idx_j
    o = offsets.round().long()
    key = (o[:, 0] * 4096 + o[:, 1]) * 4096 + o[:, 2]
    return (idx_i < idx_j) | ((idx_i == idx_j) & (key > 0))


class SpookyNet(nn.Module):
    """The SpookyNet energy model (Unke et al. 2021). See module docstring.

    Inputs follow the reference: Z [N] long, Q [B], S [B], R [N,3] (A), idx_i/idx_j [P] with every
    pair in both directions, optional cell [B,3,3] and integer cell_offsets [P,3], batch_seg [N].
    """

    def __init__(self, config: SpookyNetConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        cfg = config or SpookyNetConfig()
        if not 0.0 <= cfg.module_keep_prob <= 1.0:
            raise ValueError("module_keep_prob must lie in [0, 1]")
        if cfg.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATION_NAMES)}, not {cfg.activation!r}")
        self.config = cfg
        F_, K, T, nr = cfg.num_features, cfg.num_basis_functions, cfg.num_modules, cfg.num_residual
        act = cfg.activation
        self.nuclear = NuclearEmbedding(F_, cfg.zmax)
        if cfg.use_nonlinear_embedding:
            self.charge_embedding = NonlinearElectronicEmbedding(F_, nr["electron"], act)
            self.spin_embedding = NonlinearElectronicEmbedding(F_, nr["electron"], act)
        else:
            self.charge_embedding = ElectronicEmbedding(F_, nr["electron"], is_charge=True, activation=act)
            self.spin_embedding = ElectronicEmbedding(F_, nr["electron"], is_charge=False, activation=act)
        self.rbf = radial_basis(cfg)
        self.interactions = nn.ModuleList(InteractionModule(F_, K, nr, seed=seed * 1000 + t,
                                                             num_random=cfg.num_random_features, activation=act)
                                          for t in range(T))
        self.readout = nn.Linear(F_, 2, bias=False)
        orthogonal_(self.readout.weight)
        self.element_bias = nn.Parameter(torch.zeros(cfg.zmax, 2))
        self.zbl = ZBLRepulsion() if cfg.use_zbl_repulsion else None
        self.electrostatics = Electrostatics(cfg.cutoff, cfg.lr_cutoff) if cfg.use_electrostatics else None
        self.d4 = D4Dispersion(cfg.lr_cutoff, cfg.zmax) if cfg.use_d4_dispersion else None
        self._sqrt3 = math.sqrt(3.0)
        self.to(torch.float32)  # one dtype throughout; cast with .double() for float64

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    @property
    def lr_cutoff(self) -> float | None:
        return self.config.lr_cutoff

    @property
    def uses_long_range(self) -> bool:
        return self.electrostatics is not None or self.d4 is not None

    def set_lr_cutoff(self, lr_cutoff: float | None) -> None:
        self.config.lr_cutoff = lr_cutoff
        if self.electrostatics is not None:
            self.electrostatics.lr_cutoff = lr_cutoff
        if self.d4 is not None:
            self.d4.set_lr_cutoff(lr_cutoff)

    def set_ewald(self, kmax: int | None, alpha: float | None = None) -> None:
        """Ewald summation of the Coulomb term for periodic cells (kmax None: off); see
        :class:`~tub_mlff.physical_terms.Electrostatics`. Molecules keep the plain pair sum."""
        if self.electrostatics is None:
            if kmax is None:
                return
            raise ValueError("this model has no electrostatics term; Ewald summation needs one")
        self.electrostatics.set_ewald(kmax, alpha)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.nuclear.element.dtype

    def supported_elements(self) -> set[int]:
        """Elements with a usable embedding (all of 1..zmax-1; D4 limits to its table rows)."""
        return set(range(1, self.config.zmax))

    # -- forward ---------------------------------------------------------------------------
    def atomic_properties(self, Z, Q, S, R, idx_i, idx_j, cell=None, cell_offsets=None,
                          batch_seg=None, num_batch: int | None = None, strain=None, lr_pairs=None) -> dict:
        """Per-atom energies (network, ZBL, Coulomb, D4), charges and features.

        ``strain`` ([B,3,3], symmetric, zero-valued, requires_grad) deforms R and the cell
        as x -> x (1 + strain), so that dE/dstrain / V is the stress.
        ``lr_pairs`` = (i, j, offsets): an optional precomputed *half* list for the long-range
        terms (each pair once); then idx_i/idx_j only need the short-range pairs. Without it the
        long-range pairs are taken from idx_i/idx_j (both directions, as in the reference).
        """
        n = Z.shape[0]
        if batch_seg is None:
            batch_seg = Z.new_zeros(n)
        if num_batch is None:
            num_batch = int(batch_seg.max().item()) + 1 if n else 1
        if strain is not None:
            R = R + torch.einsum("ni,nij->nj", R, strain.index_select(0, batch_seg))
            if cell is not None:
                cell = cell + torch.bmm(cell, strain)
        def pair_vectors(ii, jj, off):
            v = R.index_select(0, jj) - R.index_select(0, ii)  # backward: index_add, not index_put
            if cell is not None and off is not None:
                if num_batch == 1:
                    v = v + off.to(R.dtype) @ cell[0]
                else:
                    v = v + torch.einsum("pi,pij->pj", off.to(R.dtype), cell.index_select(0, batch_seg[ii]))
            return v

        vij = pair_vectors(idx_i, idx_j, cell_offsets)
        rij = torch.linalg.norm(vij, dim=-1)

        # short-range geometry
        sr = rij < self.config.cutoff
        sr_r, sr_v = rij[sr], vij[sr]
        sr_i, sr_j = idx_i[sr], idx_j[sr]
        pij = sr_v / sr_r.unsqueeze(-1)
        x_, y_, z_ = pij[:, 0], pij[:, 1], pij[:, 2]
        s3 = self._sqrt3
        if self.config.use_irreps:  # the five real l=2 harmonics
            dij = torch.stack([s3 * x_ * y_, s3 * x_ * z_, s3 * y_ * z_, 0.5 * (3 * z_ * z_ - 1.0),
                               0.5 * s3 * (x_ * x_ - y_ * y_)], dim=-1)
        else:  # the reference's older reducible Cartesian set: x2, y2, z2, sqrt2 xy, xz, yz
            s2 = math.sqrt(2.0)
            dij = torch.stack([x_ * x_, y_ * y_, z_ * z_, s2 * x_ * y_, s2 * x_ * z_, s2 * y_ * z_], dim=-1)
        fc = cutoff_function(sr_r, self.config.cutoff)
        rbf = self.rbf(sr_r, fc)

        # embeddings and modules
        e_z = self.nuclear(Z)
        x = e_z + self.charge_embedding(e_z, Q, batch_seg, num_batch) \
            + self.spin_embedding(e_z, S, batch_seg, num_batch)
        f = torch.zeros_like(x)
        keep = x.new_ones(num_batch, 1)
        drop = self.training and self.config.module_keep_prob < 1.0
        p_keep = self.config.module_keep_prob ** (1.0 / max(self.config.num_modules - 1, 1))
        layout = PairLayout(sr_i, sr_j, rbf, pij, dij, n)
        for module in self.interactions:
            x, y = module(x, layout, batch_seg, num_batch)
            if drop:  # module dropout: module 1 always kept, a dropped module drops all later ones
                y = y * keep.index_select(0, batch_seg)
                keep = keep * torch.bernoulli(torch.full_like(keep, p_keep))
            f = f + y
        out = self.readout(f) + self.element_bias.index_select(0, Z)
        ea, qa = out[:, 0], out[:, 1]
        # charge conservation: spread the leftover charge uniformly (Eq. 15)
        counts = scatter_sum(torch.ones_like(qa), batch_seg, num_batch)
        leftover = Q.to(qa.dtype) - scatter_sum(qa, batch_seg, num_batch)
        qa = qa + (leftover / counts).index_select(0, batch_seg)

        zeros = torch.zeros_like(ea)
        e_rep = zeros
        if self.zbl is not None:
            half = sr_i < sr_j if cell_offsets is None else half_pair_mask(sr_i, sr_j, cell_offsets[sr])
            hi, hj = sr_i[half], sr_j[half]
            e_rep = _split_half(self.zbl.pair_energy(Z.to(ea.dtype), sr_r[half], fc[half], hi, hj), hi, hj, n)
        e_ele = e_vdw = pol = c6 = zeros
        if self.uses_long_range:
            if lr_pairs is None:
                lr = half_pair_mask(idx_i, idx_j, cell_offsets)
                if self.config.lr_cutoff is not None:
                    lr = lr & (rij < self.config.lr_cutoff)
                li, lj, lrr = idx_i[lr], idx_j[lr], rij[lr]
            else:
                li, lj, loff = lr_pairs
                lrr = torch.linalg.norm(pair_vectors(li, lj, loff), dim=-1)
                if self.config.lr_cutoff is not None:
                    keep = lrr < self.config.lr_cutoff
                    li, lj, lrr = li[keep], lj[keep], lrr[keep]
            if self.electrostatics is not None:
                e_ele = _split_half(self.electrostatics.pair_energy(qa, lrr, li, lj), li, lj, n)
                if self.electrostatics.ewald_kmax is not None and cell is not None:
                    e_ele = e_ele + self.electrostatics.reciprocal_energy(qa, R, cell, batch_seg, num_batch)
            if self.d4 is not None:
                if not self.d4.has_tables:
                    raise RuntimeError("D4 dispersion is on but no D4 tables are loaded: load a model that has them "
                                       "(tub_mlff.checkpoints.load_model of a reference .pth or a tub model saved "
                                       "with D4), or build this one with SpookyNetConfig(use_d4_dispersion=False)")
                e_vdw, pol, c6 = self.d4.atomic_energy(n, Z, qa, lrr, li, lj, self.config.compute_d4_atomic)
        return {"features": f, "e_nn": ea, "charges": qa, "e_zbl": e_rep, "e_coulomb": e_ele,
                "e_d4": e_vdw, "polarizabilities": pol, "c6": c6, "batch_seg": batch_seg,
                "num_batch": num_batch}

    def forward(self, Z, Q, S, R, idx_i, idx_j, cell=None, cell_offsets=None, batch_seg=None,
                num_batch=None, strain=None, lr_pairs=None) -> dict:
        props = self.atomic_properties(Z, Q, S, R, idx_i, idx_j, cell, cell_offsets, batch_seg,
                                       num_batch, strain, lr_pairs)
        atomic = props["e_nn"] + props["e_zbl"] + props["e_coulomb"] + props["e_d4"]
        props["atomic_energy"] = atomic
        props["energy"] = total_energy(atomic, props["batch_seg"], props["num_batch"])
        return props


def total_energy(atomic: torch.Tensor, batch_seg: torch.Tensor, num_batch: int) -> torch.Tensor:
    """Sum of the atomic energies per structure, accurate in float32 too: ``index_add_`` adds one atom after
    another into a total near -6e4 eV (a 1000-atom cell), where a float32 step is 4 meV, and was 0.68 eV off.
    One structure: ``torch.sum`` (pairwise summation); a batch: accumulated in float64 (not on Apple MPS, which
    has none), then rounded to the model's dtype once."""
    if num_batch == 1:
        return atomic.sum().reshape(1)
    if atomic.dtype == torch.float64 or atomic.device.type == "mps":
        return scatter_sum(atomic, batch_seg, num_batch)
    return scatter_sum(atomic.double(), batch_seg, num_batch).to(atomic.dtype)
