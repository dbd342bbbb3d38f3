"""Explanations of a SpookyNet prediction.

1. Per-atom decomposition (Unke et al. 2021 report the same split): E = sum_i (e_i + e_zbl,i +
   e_coulomb,i + e_d4,i), with charges q_i and, where D4 tables are loaded, polarisabilities and
   C6_ii. Pair terms are shared half-half between the two atoms.
2. Per-site comparison for sodium: each Na is classed by its nearest feature (aromatic ring
   centre within 3.2 A -> "ring" (cation-pi), amine N within 3.0 A -> "amine", otherwise
   "graphene"), and its energy contribution and charge are averaged per class.
3. Nonlocal attention maps per interaction module: A_ij = phi(q_i).phi(k_j) / sum_j phi(q_i).phi(k_j),
   the row-normalised weights the Performer attention (Eq. 11) actually applies (a committee:
   each member's and their mean).
4. Committee disagreement (several models): per atom, the RMS deviation of the members' force
   vectors from their mean, the usual uncertainty signal of active learning (e.g. Smith et
   al. 2018, "Less is more: sampling chemical space with active learning").
5. GNN-LRP 1-, 2- and 3-body relevances from relevant walks: :mod:`tub_mlff.relevant_walks`.
"""

from __future__ import annotations

import numpy as np
import torch

from .properties import compute


def decompose(calc, atoms) -> dict:
    """Per-atom arrays (eV, e) for one structure: the committee members' mean (each term is
    per-atom additive, so the mean arrays still sum to the committee's mean energy, the energy
    that ``md`` and ``evaluate`` use)."""
    batch = calc.batch_for(atoms)
    members = []
    for model in calc.models:
        old = model.config.compute_d4_atomic
        model.config.compute_d4_atomic = model.d4 is not None
        try:
            out = compute(model, batch, forces=True)
        finally:
            model.config.compute_d4_atomic = old
        arr = lambda k: out[k].detach().cpu().double().numpy()  # noqa: E731
        res = {"e_nn": arr("e_nn"), "e_zbl": arr("e_zbl"), "e_coulomb": arr("e_coulomb"), "e_d4": arr("e_d4"),
               "charges": arr("charges"), "forces": arr("forces")}
        if model.d4 is not None:
            res["polarizability_A3"] = arr("polarizabilities")
            res["c6_eVA6"] = arr("c6")
        res["energy"] = float(out["energy"].sum().item())
        members.append(res)
    shared = set.intersection(*(set(m) for m in members))  # D4 arrays only where every member has D4
    res = {k: np.mean([m[k] for m in members], axis=0) for k in shared}
    res["energy"] = float(res["energy"])
    res["atomic_energy"] = res["e_nn"] + res["e_zbl"] + res["e_coulomb"] + res["e_d4"]
    return res


def committee_disagreement(calc, atoms) -> np.ndarray:
    """Per-atom force disagreement (eV/A) of the calculator's committee members."""
    b = atoms.copy()
    b.calc = calc
    b.get_forces()
    return np.asarray(calc.results["force_disagreement"], dtype=np.float64)


def _sheet_planes(atoms, carbon) -> np.ndarray:
    """z of the graphene sheets: 0.5-A bins holding a quarter of the carbons or more (a bilayer has
    two; the ring carbons of the groups spread over several bins and never reach that)."""
    z = atoms.positions[carbon, 2]
    if len(z) == 0:
        return np.zeros(1)
    bins = np.round(z / 0.5)
    values, counts = np.unique(bins, return_counts=True)
    planes = [float(np.median(z[bins == v])) for v, c in zip(values, counts) if c >= 0.25 * len(z)]
    return np.array(planes or [float(np.median(z))])


def classify_sodium_sites(atoms, ring_cutoff: float = 3.2, amine_cutoff: float = 3.0) -> dict[int, str]:
    """Na index -> 'ring' | 'amine' | 'graphene' (minimum-image distances)."""
    from ase.geometry import find_mic
    from ase.neighborlist import neighbor_list

    sym = np.array(atoms.get_chemical_symbols())
    na = np.where(sym == "Na")[0]
    if len(na) == 0:
        return {}
    # aromatic rings: carbons with 2-3 carbon neighbours that bond to H or to a ring carbon above the sheet
    i, j = neighbor_list("ij", atoms, 1.6)
    carbon = sym == "C"
    planes = _sheet_planes(atoms, carbon)
    ring_atoms = [k for k in np.where(carbon)[0] if np.abs(atoms.positions[k, 2] - planes).min() > 1.0]
    centres = []
    if ring_atoms:
        # group ring carbons by connectivity
        ring_set = set(ring_atoms)
        seen = set()
        for r0 in ring_atoms:
            if r0 in seen:
                continue
            comp, stack = [], [r0]
            while stack:
                a = stack.pop()
                if a in seen:
                    continue
                seen.add(a)
                comp.append(a)
                stack += [int(b) for b in j[i == a] if int(b) in ring_set and int(b) not in seen]
            if len(comp) >= 6:
                ref = atoms.positions[comp[0]]
                vec, _ = find_mic(atoms.positions[comp] - ref, atoms.cell, atoms.pbc)
                centres.append(ref + vec.mean(0))
    nitrogens = atoms.positions[sym == "N"]
    out = {}
    for k in na:
        label = "graphene"
        p = atoms.positions[k]
        if centres:
            d, dl = find_mic(np.asarray(centres) - p, atoms.cell, atoms.pbc)
            if dl.min() < ring_cutoff:
                label = "ring"
        if label == "graphene" and len(nitrogens):
            d, dl = find_mic(nitrogens - p, atoms.cell, atoms.pbc)
            if dl.min() < amine_cutoff:
                label = "amine"
        out[int(k)] = label
    return out


def site_summary(decomposition: dict, sites: dict[int, str]) -> dict:
    """Mean per-atom energy and charge of Na at each site class."""
    summary = {}
    for label in sorted(set(sites.values())):
        idx = [k for k, v in sites.items() if v == label]
        summary[label] = {"count": len(idx),
                          "mean_atomic_energy_eV": float(np.mean(decomposition["atomic_energy"][idx])),
                          "mean_charge_e": float(np.mean(decomposition["charges"][idx]))}
    return summary


def attention_maps(calc, atoms) -> dict[str, np.ndarray]:
    """Row-normalised nonlocal attention matrices [N, N] per interaction module: ``module_t``.

    A committee gets each member's maps (``member_m_module_t``) and, as ``module_t``, their mean
    (still row-stochastic), when all members have the same number of modules."""
    b = calc.batch_for(atoms)
    per_member = [_member_attention(model, b) for model in calc.models]
    if len(per_member) == 1:
        return {f"module_{t + 1}": a for t, a in enumerate(per_member[0])}
    out = {f"member_{m}_module_{t + 1}": a for m, maps in enumerate(per_member) for t, a in enumerate(maps)}
    if len({len(maps) for maps in per_member}) == 1:
        out.update({f"module_{t + 1}": np.mean([maps[t] for maps in per_member], axis=0)
                    for t in range(len(per_member[0]))})
    return out


def _member_attention(model, b) -> list[np.ndarray]:
    mods = [m.nonlocal_ for m in model.interactions]
    for m in mods:
        m.keep_attention = True
    try:
        with torch.no_grad():
            model(b["Z"], b["Q"], b["S"], b["R"], b["idx_i"], b["idx_j"], b.get("cell"), b.get("cell_offsets"),
                  None, 1, lr_pairs=b.get("lr_pairs"))
        maps = []
        for m in mods:
            q, k = m.last_phi
            a = (q @ k.T).double()
            maps.append((a / a.sum(-1, keepdim=True)).cpu().numpy())
    finally:
        for m in mods:
            m.keep_attention = False
            m.last_phi = None
    return maps
