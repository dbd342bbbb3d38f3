"""SpookyNet's physically motivated energy terms: ZBL repulsion, electrostatics, D4 dispersion.

Unke et al., Nat. Commun. 12, 7273 (2021), Eqs. 13-17 (Methods, "Empirical augmentations");
tub spec §2.6. Units: Angstrom, eV, elementary charge.

All pair terms here are symmetric in (i, j). They take a *half* pair list (each unordered pair,
or each periodic image pair, once) and give each atom half of every pair energy, which equals
the reference's (1/2) sum over both directions term by term, at half the cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import softplus_inverse, switch_function

KE = 14.399645351950548  # Coulomb constant, eV * Angstrom
BOHR = 0.5291772105638411  # Angstrom
HARTREE = 27.211386024367243  # eV


def _split_half(pair_energy: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor, n: int) -> torch.Tensor:
    """Per-atom share of symmetric pair energies: half to each partner."""
    half = 0.5 * pair_energy
    out = pair_energy.new_zeros(n)
    out.index_add_(0, idx_i, half)
    out.index_add_(0, idx_j, half)
    return out


class ZBLRepulsion(nn.Module):
    """Learnable ZBL-like nuclear repulsion (Eq. 13; Ziegler, Biersack, Littmark 1985).

    E_rep,i = (k_e/2) sum_j Z_i Z_j / r f_c(r) sum_k c_k exp(-a_k (Z_i^p + Z_j^p) r / d),
    c normalised to sum to one; all constants are softplus-parametrised.
    """

    C0 = (0.18180, 0.50990, 0.28020, 0.02817)
    A0 = (3.2, 0.9423, 0.4028, 0.2016)

    def __init__(self) -> None:
        super().__init__()
        self.adiv_raw = nn.Parameter(torch.tensor([softplus_inverse(1.0 / (0.8854 * BOHR))]))
        self.apow_raw = nn.Parameter(torch.tensor([softplus_inverse(0.23)]))
        self.c_raw = nn.Parameter(torch.tensor([softplus_inverse(c) for c in self.C0]))
        self.a_raw = nn.Parameter(torch.tensor([softplus_inverse(a) for a in self.A0]))

    def pair_energy(self, zf: torch.Tensor, r: torch.Tensor, fc: torch.Tensor,
                    idx_i: torch.Tensor, idx_j: torch.Tensor) -> torch.Tensor:
        zp = zf ** F.softplus(self.apow_raw)
        a = ((zp.index_select(0, idx_i) + zp.index_select(0, idx_j)) * F.softplus(self.adiv_raw)).unsqueeze(-1) * F.softplus(self.a_raw)
        c = F.softplus(self.c_raw)
        c = c / c.sum()
        screening = (c * torch.exp(-a * r.unsqueeze(-1))).sum(-1)
        return KE * zf.index_select(0, idx_i) * zf.index_select(0, idx_j) / r * screening * fc


class Electrostatics(nn.Module):
    """Shielded point-charge Coulomb energy (Eq. 14) with an optional shifted-force long-range cut
    or Ewald summation for periodic cells.

    Pair term k_e q_i q_j [f_sw / sqrt(r^2+1) + (1 - f_sw) / r], f_sw switching from 1 to 0
    between 0.25 r_c and 0.75 r_c. With lr_cutoff L both kernels are shifted so value and force
    vanish at L (zero beyond).

    Ewald (:meth:`set_ewald`; Ewald 1921, as in the reference's ``set_kmax``/``set_alpha``, spec
    §2.6): the pair term is multiplied by erfc(alpha r) (no shift) and :meth:`reciprocal_energy`
    adds (2 pi / V) sum_{k != 0} exp(-k^2 / 4 alpha^2) / k^2 |sum_i q_i exp(i k.R_i)|^2 minus the
    self term alpha q_i^2 / sqrt(pi). Unlike the reference, k runs over the full reciprocal
    lattice k = 2 pi n inv(cell)^T, so triclinic cells are summed correctly (the reference takes
    the cell diagonal), and a charged cell gets the neutralising-background term
    -pi Q^2 / (2 V alpha^2), without which its energy would depend on alpha.
    """

    def __init__(self, cutoff: float, lr_cutoff: float | None = None) -> None:
        super().__init__()
        self.cuton = 0.25 * cutoff
        self.cutoff = 0.75 * cutoff
        self.lr_cutoff = lr_cutoff
        self.ewald_kmax: int | None = None
        self.alpha = 0.0
        self.register_buffer("kmul", torch.zeros(0, 3), persistent=False)

    def set_ewald(self, kmax: int | None, alpha: float | None = None) -> None:
        """Ewald summation with integer reciprocal vectors |n| <= kmax (None: off) and damping
        alpha (default 4 / (0.75 r_c) + 1e-3, so erfc(alpha r) < 1e-8 past the switch)."""
        self.ewald_kmax = kmax
        if kmax is None:
            return
        if kmax < 1:
            raise ValueError("ewald kmax must be a positive integer")
        self.alpha = float(alpha) if alpha is not None else 4.0 / self.cutoff + 1e-3
        r = torch.arange(-kmax, kmax + 1)
        n = torch.cartesian_prod(r, r, r)
        n2 = (n ** 2).sum(-1)
        self.kmul = n[(n2 > 0) & (n2 <= kmax ** 2)].to(device=self.kmul.device, dtype=torch.float64)

    def pair_energy(self, q: torch.Tensor, r: torch.Tensor, idx_i: torch.Tensor,
                    idx_j: torch.Tensor) -> torch.Tensor:
        f = switch_function(r, self.cuton, self.cutoff)
        coulomb = 1.0 / r
        damped = 1.0 / torch.sqrt(r ** 2 + 1.0)
        L = self.lr_cutoff
        if self.ewald_kmax is not None:
            kernel = (f * damped + (1.0 - f) * coulomb) * torch.erfc(self.alpha * r)
            return KE * q.index_select(0, idx_i) * q.index_select(0, idx_j) * kernel
        if L is not None:
            inside = r < L
            coulomb = torch.where(inside, coulomb + r / L ** 2 - 2.0 / L, torch.zeros_like(r))
            damped = torch.where(inside, damped + r * L / (L ** 2 + 1.0) ** 1.5
                                 - (2 * L ** 2 + 1.0) / (L ** 2 + 1.0) ** 1.5, torch.zeros_like(r))
        # index_select, not q[idx]: its backward is a fast index_add rather than index_put
        return KE * q.index_select(0, idx_i) * q.index_select(0, idx_j) * (f * damped + (1.0 - f) * coulomb)

    def reciprocal_energy(self, q: torch.Tensor, R: torch.Tensor, cell: torch.Tensor, batch_seg: torch.Tensor,
                          num_batch: int, eps: float = 1e-8) -> torch.Tensor:
        """Per-atom reciprocal-space, background and self energies of the Ewald sum (eV).

        The structure's reciprocal and background energy is shared among its atoms with weights
        (q_i^2 + eps) / sum(q^2 + eps), as in the reference, so per-atom energies still add up.
        """
        kvec = 2 * math.pi * torch.einsum("kc,bdc->bkd", self.kmul.to(R.dtype), torch.linalg.inv(cell))
        k2 = (kvec ** 2).sum(-1)  # [B, K]
        a2 = self.alpha ** 2
        phase = torch.einsum("nd,nkd->nk", R, kvec.index_select(0, batch_seg))
        zeros = q.new_zeros(num_batch, phase.shape[-1])
        re = zeros.index_add(0, batch_seg, q.unsqueeze(-1) * torch.cos(phase))
        im = zeros.index_add(0, batch_seg, q.unsqueeze(-1) * torch.sin(phase))
        volume = torch.linalg.det(cell).abs()
        e_rec = 2 * math.pi / volume * ((re ** 2 + im ** 2) * torch.exp(-k2 / (4 * a2)) / k2).sum(-1)
        total_q = q.new_zeros(num_batch).index_add(0, batch_seg, q)
        e_rec = e_rec - math.pi * total_q ** 2 / (2 * volume * a2)
        w = q * q + eps
        w = w / w.new_zeros(num_batch).index_add(0, batch_seg, w).index_select(0, batch_seg)
        return KE * (w * e_rec.index_select(0, batch_seg) - self.alpha / math.sqrt(math.pi) * q * q)


D4_TABLES = ("refsys", "zeff", "refh", "sscale", "secaiw", "gam", "ascale", "alphaiw", "hcount",
             "casimir_polder_weights", "rcov", "en", "ncount_mask", "ncount_weight", "cn",
             "fixgweights", "refq", "sqrt_r4r2", "alpha")


class D4Dispersion(nn.Module):
    """Charge-dependent D4 dispersion with Becke-Johnson damping (Eq. 17; Caldeweyher et al. 2019).

    The element reference tables come from dftd4 (LGPL-3); tub never ships them. They are
    buffers filled from a checkpoint (e.g. the reference ``parameters.pth``) via
    :meth:`load_tables`. ``refc6`` is derived from them after every load and never saved.

    Note kept for parity: with a long-range cutoff L the coordination-number switch starts only
    one Bohr radius *in Bohr units* (0.529 bohr = 0.28 A) below L/a0 -- probably a unit slip in
    the reference, reproduced here on purpose.
    """

    K2, K4, K5, K6, KN, WF, GA, GC = 4.0 / 3.0, 4.10451, 19.08857, 254.5553148552, 7.5, 6.0, 3.0, 2.0

    def __init__(self, lr_cutoff: float | None = None, zmax: int = 87) -> None:
        super().__init__()
        self.s6_raw = nn.Parameter(torch.tensor(softplus_inverse(1.0)), requires_grad=False)
        self.s8_raw = nn.Parameter(torch.tensor(softplus_inverse(1.61679827)))
        self.a1_raw = nn.Parameter(torch.tensor(softplus_inverse(0.44959224)))
        self.a2_raw = nn.Parameter(torch.tensor(softplus_inverse(3.35743605)))
        self.scaleq_raw = nn.Parameter(torch.tensor(softplus_inverse(1.0)))
        self.zmax = zmax
        self.has_tables = False
        self.set_lr_cutoff(lr_cutoff)

    def set_lr_cutoff(self, lr_cutoff: float | None) -> None:
        self.lr_cutoff = lr_cutoff
        if lr_cutoff is None:
            self.cutoff_bohr = None
            self.cuton_bohr = None
        else:
            self.cutoff_bohr = lr_cutoff / BOHR
            self.cuton_bohr = self.cutoff_bohr - BOHR  # sic: see class docstring

    def load_tables(self, tables: dict[str, torch.Tensor]) -> None:
        """Install the D4 reference tables (a dict with the names in ``D4_TABLES``)."""
        missing = [k for k in D4_TABLES if k not in tables]
        if missing:
            raise KeyError(f"D4 tables missing: {missing}")
        for name in D4_TABLES:
            t = tables[name].detach().cpu()
            t = t.long() if name == "refsys" else t.to(torch.float64)
            if name not in ("sscale", "secaiw", "casimir_polder_weights"):
                t = t[: self.zmax]
            self.register_buffer(name, t.clone())
        self.has_tables = True
        self.compute_refc6()

    def tables(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in D4_TABLES} if self.has_tables else {}

    @torch.no_grad()
    def compute_refc6(self) -> None:
        """refC6[Za, Zb, r, s] = 3/pi sum_w alpha_ar(iw) alpha_bs(iw) cp_w (float64, not saved)."""
        dev = self.zeff.device
        allz = torch.arange(self.zmax, device=dev)
        is_ = self.refsys[allz]
        iz = self.zeff[is_].double()
        refh = self.refh[allz].double() * F.softplus(self.scaleq_raw.detach().double())
        qmod = iz + refh
        qmod_safe = torch.where(qmod > 1e-8, qmod, torch.ones_like(qmod))
        scale = torch.where(
            qmod > 1e-8,
            torch.exp(self.GA * (1 - torch.exp(self.gam[is_].double() * self.GC * (1 - iz / qmod_safe)))),
            math.exp(self.GA) * torch.ones_like(qmod))
        nref = self.refsys.shape[-1]
        alpha = self.sscale[is_].double().view(-1, nref, 1) * self.secaiw[is_].double() * scale.view(-1, nref, 1)
        alpha = torch.clamp(self.ascale[allz].double().view(-1, nref, 1)
                            * (self.alphaiw[allz].double() - self.hcount[allz].double().view(-1, nref, 1) * alpha),
                            min=0.0)
        refc6 = 3.0 / math.pi * torch.einsum("arw,bsw,w->abrs", alpha, alpha,
                                              self.casimir_polder_weights.double())
        self.register_buffer("refc6", refc6, persistent=False)

    def atomic_energy(self, n: int, z: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                      idx_i: torch.Tensor, idx_j: torch.Tensor, atomic_properties: bool = False):
        """Per-atom D4 energy (eV) on a half pair list; optionally polarisabilities and C6_ii."""
        dtype = q.dtype
        zeros = q.new_zeros(n)
        if idx_i.numel() == 0 and not atomic_properties:
            return zeros, zeros, zeros
        rb = r / BOHR
        zi, zj = z[idx_i], z[idx_j]
        rcov, en = self.rcov.to(dtype), self.en.to(dtype)
        rco = self.K2 * (rcov[zi] + rcov[zj])
        den = self.K4 * torch.exp(-((torch.abs(en[zi] - en[zj]) + self.K5) ** 2) / self.K6)
        term = den * 0.5 * (1.0 + torch.erf(-self.KN * (rb - rco) / rco))
        if self.cutoff_bohr is not None:
            term = term * switch_function(rb, self.cuton_bohr, self.cutoff_bohr)
        cn = zeros.clone().index_add_(0, idx_i, term).index_add_(0, idx_j, term)
        # Gaussian weights over reference systems
        mask, weight, cnref = (self.ncount_mask[z].to(dtype), self.ncount_weight[z].to(dtype),
                               self.cn[z].to(dtype))
        gw = torch.sum(mask * torch.exp(-self.WF * weight * (cn.view(-1, 1, 1) - cnref) ** 2), -1)
        norm = gw.sum(-1, keepdim=True)
        norm_safe = torch.where(norm > 1e-8, norm, torch.ones_like(norm))
        gw = torch.where(norm > 1e-8, gw / norm_safe, self.fixgweights[z].to(dtype))
        # charge scaling zeta
        iz = self.zeff[z].to(dtype).view(-1, 1)
        qref = iz + self.refq[z].to(dtype) * F.softplus(self.scaleq_raw).to(dtype)
        qmod = iz + q.view(-1, 1)
        qmod_safe = torch.where(qmod > 1e-8, qmod, torch.ones_like(qmod))
        gam = self.gam[z].to(dtype).view(-1, 1)
        zeta = torch.where(qmod > 1e-8,
                           torch.exp(self.GA * (1 - torch.exp(gam * self.GC * (1 - qref / qmod_safe)))),
                           math.exp(self.GA) * torch.ones_like(qmod)) * gw
        # C6_ij = zeta_i^T refC6[Zi, Zj] zeta_j. Contract zeta_i with refC6 once per (atom, element
        # of j) -- [N, T, nref] -- so each pair only needs an nref-long dot product, not nref^2.
        types = torch.unique(z)
        refc6 = self.refc6[types][:, types].to(dtype)  # [T, T, nref, nref]: only the elements present
        tj = torch.searchsorted(types, zj)
        zt = torch.searchsorted(types, z)  # element index of each atom among those present
        u = torch.einsum("nr,ntrs->nts", zeta, refc6[zt])
        T = types.shape[0]
        c6 = (u.reshape(n * T, -1).index_select(0, idx_i * T + tj) * zeta.index_select(0, idx_j)).sum(-1)
        sq = self.sqrt_r4r2.to(dtype)
        qij = math.sqrt(3.0) * sq[zi] * sq[zj]
        r0 = F.softplus(self.a1_raw).to(dtype) * qij + F.softplus(self.a2_raw).to(dtype)
        if self.cutoff_bohr is None:
            oor6 = 1.0 / (rb ** 6 + r0 ** 6)
            oor8 = 1.0 / (rb ** 8 + r0 ** 8)
        else:
            L = self.cutoff_bohr
            t = rb / L - 1.0
            l6, l8, r06, r08 = L ** 6, L ** 8, r0 ** 6, r0 ** 8
            oor6 = 1.0 / (rb ** 6 + r06) - 1.0 / (l6 + r06) + 6 * l6 / (l6 + r06) ** 2 * t
            oor8 = 1.0 / (rb ** 8 + r08) - 1.0 / (l8 + r08) + 8 * l8 / (l8 + r08) ** 2 * t
            inside = rb < L
            oor6 = torch.where(inside, oor6, torch.zeros_like(oor6))
            oor8 = torch.where(inside, oor8, torch.zeros_like(oor8))
        s6, s8 = F.softplus(self.s6_raw).to(dtype), F.softplus(self.s8_raw).to(dtype)
        pair = -c6 * (s6 * oor6 + s8 * qij ** 2 * oor8) * HARTREE
        energy = _split_half(pair, idx_i, idx_j, n)
        if atomic_properties:
            pol = torch.sum(zeta * self.alpha[z, :, 0].to(dtype), -1) * BOHR ** 3
            c6ii = torch.einsum("nr,nrs,ns->n", zeta, refc6[zt, zt], zeta) * HARTREE * BOHR ** 6
            return energy, pol, c6ii
        return energy, zeros, zeros
