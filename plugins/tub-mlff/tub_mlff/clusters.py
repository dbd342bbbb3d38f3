"""Finite clusters carved from periodic cells, with cut covalent bonds capped by hydrogen.

All-electron DFT (PySCF) is impractical for periodic Na_x AB cells, so reference labels come from
clusters: every atom (of every periodic image) within ``radius`` of a centre atom, with the cut
bonds saturated by hydrogen link atoms placed along the broken bond at a standard X-H length. This
is the hydrogen-capping used for cluster models and the link atoms of QM/MM (Field, Bash & Karplus,
J. Comput. Chem. 11, 700 (1990); Senn & Thiel, Angew. Chem. Int. Ed. 48, 1198 (2009)).

Rules (one cluster per centre atom):

1. Positions are unwrapped around the centre: an atom enters as the periodic image
   ``positions[j] + shift @ cell`` (integer ``shift``) that lies within ``radius`` of the centre,
   so the cluster keeps the parent's frame (the centre has shift 0). When ``radius`` exceeds half
   the cell width, several images of one parent atom can enter; each is its own cluster atom.
2. Covalent bonds join atoms of the covalent elements (H, B, C, N, O, F, Si, P, S, Cl, Br, I)
   closer than ``bond_scale`` x the sum of their covalent radii; other elements (Na, Li, K, ...)
   form no bonds: they are kept if inside the sphere and dropped otherwise.
3. Monovalent atoms (H, halogens) follow their bonded partner: a terminal H is kept iff the heavy
   atom it is bonded to is kept, even if the H itself lies just outside the sphere.
4. An outside heavy atom bonded to two or more kept atoms is added: two caps would otherwise fall
   within ~0.6 A of each other (graphene: 120 degree bonds).
5. A kept heavy atom that would need two or more caps, and more caps than it keeps bonds (a graphene
   carbon hanging on by one bond, which would become an sp2 =CH2 end), is removed, unless it is the
   centre. Rule 4 runs to a fixed point, then rule 5 (which cannot undo rule 4); graphene pieces then end in complete rings
   with one H per edge carbon, and their SCF converges far better than with dangling ends.
6. Every remaining cut bond X-Y (X kept, Y not) gets a cap H at X + d(X-H) * (Y - X)/|Y - X|,
   d = 1.09 A for C, 1.01 for N, 0.96 for O (table ``CAP_LENGTHS``).

The cluster carries ``arrays["parent_index"]`` (index into the parent, -1 for caps),
``arrays["parent_shift"]`` (lattice image of that atom), ``arrays["cap_of"]`` (for caps, the
cluster index of the atom they saturate, else -1) and ``arrays["in_sphere"]`` (inside ``radius``);
``info`` gets ``cluster_center``, ``cluster_radius``, the charge (inherited from the parent, default
0) and the spin (lowest allowed by the cluster's electron count; the parent's spin does not carry
over since cutting changes the electron count).
"""

from __future__ import annotations

import numpy as np

COVALENT = {"H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Br", "I"}
MONOVALENT = {"H", "F", "Cl", "Br", "I"}
CAP_LENGTHS = {"B": 1.19, "C": 1.09, "N": 1.01, "O": 0.96, "Si": 1.48, "P": 1.42, "S": 1.34}  # X-H, A


class ClusterError(ValueError):
    """A cluster cannot be carved as asked (bad centre, radius, or an uncappable bond)."""


def bond_cutoffs(symbols, bond_scale: float = 1.2) -> dict[tuple[str, str], float]:
    """Covalent bond cutoffs, bond_scale x (r_cov,a + r_cov,b), for the covalent elements present."""
    from ase.data import atomic_numbers, covalent_radii

    present = sorted(set(symbols) & COVALENT)
    cut = {}
    for a in present:
        for b in present:
            if a in MONOVALENT and b in MONOVALENT and not (a == "H" and b == "H"):
                continue
            cut[(a, b)] = bond_scale * (covalent_radii[atomic_numbers[a]] + covalent_radii[atomic_numbers[b]])
    return cut


def covalent_bonds(atoms, bond_scale: float = 1.2):
    """Directed bonds of the (periodic) structure: arrays i, j, shift with r_j + shift @ cell bonded to r_i."""
    from ase.neighborlist import neighbor_list

    symbols = atoms.get_chemical_symbols()
    cut = bond_cutoffs(symbols, bond_scale)
    if not cut:
        return np.zeros(0, int), np.zeros(0, int), np.zeros((0, 3), int)
    i, j, shift = neighbor_list("ijS", atoms, cut)
    return i, j, shift.astype(int)


def _images_within(atoms, centre: int, radius: float):
    """(parent index, shift) of every periodic image within ``radius`` of atom ``centre``."""
    pos = atoms.positions
    cell = atoms.cell.array
    pbc = np.asarray(atoms.pbc, dtype=bool)
    reach = []
    if pbc.any():
        volume = abs(np.linalg.det(cell))
        for k in range(3):
            if not pbc[k]:
                reach.append(0)
                continue
            width = volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3]))
            reach.append(int(np.ceil(radius / width)) + 1)
    else:
        reach = [0, 0, 0]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    shifts = np.stack([g.ravel() for g in grids], axis=1)  # [M, 3]
    images = pos[None, :, :] + (shifts @ cell)[:, None, :] if pbc.any() else pos[None]
    d = np.linalg.norm(images - pos[centre], axis=-1)  # [M, N]
    m, j = np.nonzero(d <= radius)
    return j, shifts[m]


def carve_cluster(atoms, centre: int, radius: float, bond_scale: float = 1.2, max_growth: int = 50):
    """Cluster of all images within ``radius`` (A) of atom ``centre``, cut bonds capped by H.

    Returns a new non-periodic ASE Atoms; ``atoms`` is not modified. See the module docstring.
    """
    from ase import Atoms

    from .structures import spin_for

    n = len(atoms)
    if not 0 <= centre < n:
        raise ClusterError(f"centre index {centre} is out of range (the structure has {n} atoms)")
    if radius <= 0:
        raise ClusterError(f"cluster radius must be positive, got {radius}")
    symbols = atoms.get_chemical_symbols()
    cell = atoms.cell.array
    bi, bj, bs = covalent_bonds(atoms, bond_scale)
    order = np.argsort(bi, kind="stable")
    bi, bj, bs = bi[order], bj[order], bs[order]
    starts = np.searchsorted(bi, np.arange(n + 1))

    def neighbours(node):
        p, s = node
        lo, hi = starts[p], starts[p + 1]
        return [(int(bj[k]), tuple(int(x) for x in np.asarray(s) + bs[k])) for k in range(lo, hi)]

    j_in, s_in = _images_within(atoms, centre, radius)
    sphere = {(int(j), tuple(int(x) for x in s)) for j, s in zip(j_in, s_in)}
    heavy = {nd for nd in sphere if symbols[nd[0]] in COVALENT and symbols[nd[0]] not in MONOVALENT}
    in_sphere = len(heavy)  # the bonded atoms the sphere itself holds
    ionic = {nd for nd in sphere if symbols[nd[0]] not in COVALENT}
    # monovalent atoms bonded to nothing (e.g. an H2 molecule, a lone H) follow the sphere rule
    loose = {nd for nd in sphere if symbols[nd[0]] in MONOVALENT
             and not any(symbols[q[0]] not in MONOVALENT for q in neighbours(nd))}

    # rule 4: grow over outside heavy atoms bonded to >= 2 kept ones, to a fixed point
    for _ in range(max_growth):
        count: dict = {}
        for nd in heavy:
            for q in neighbours(nd):
                if q not in heavy and symbols[q[0]] not in MONOVALENT:
                    count[q] = count.get(q, 0) + 1
        grow = {q for q, c in count.items() if c >= 2}
        if not grow:
            break
        heavy |= grow
    else:
        raise ClusterError(f"cluster around atom {centre} kept growing; use a smaller radius or check the bonds")
    # rule 5: prune kept heavy atoms that would need >= 2 caps and more caps than kept bonds (dangling
    # =CH2 / -CH3 ends), to a fixed point. Pruning only lowers the kept-neighbour counts of outside
    # atoms, so rule 4 still holds afterwards.
    centre_node = (int(centre), (0, 0, 0))
    while True:
        prune = set()
        for nd in heavy - {centre_node}:
            nb = [q for q in neighbours(nd) if symbols[q[0]] not in MONOVALENT]
            kept_bonds = sum(q in heavy for q in nb)
            cut = len(nb) - kept_bonds
            if cut >= 2 and cut > kept_bonds:
                prune.add(nd)
        if not prune:
            break
        heavy -= prune
    if in_sphere and not heavy:  # only the ions would be left: an isolated atom, not its environment
        raise ClusterError(f"every one of the {in_sphere} bonded atom(s) within {radius:g} A of atom {centre} was "
                           "pruned as a dangling fragment, which would leave the bare ion(s); use a larger "
                           "--cluster-radius")
    if len(sphere) == 1 and len(atoms) > 1:
        raise ClusterError(f"no other atom lies within {radius:g} A of atom {centre}: the cluster would be that atom "
                           "alone, not its environment; use a larger --cluster-radius")

    kept = sorted(heavy) + sorted(ionic - heavy) + sorted(loose)
    caps = []  # (host node, direction)
    for nd in sorted(heavy):
        for q in neighbours(nd):
            if q in heavy:
                continue
            if symbols[q[0]] in MONOVALENT:
                kept.append(q)  # rule 3: terminal atoms follow their partner
                continue
            if symbols[nd[0]] not in CAP_LENGTHS:
                raise ClusterError(f"cannot cap a cut bond of {symbols[nd[0]]} (atom {nd[0]}); "
                                   f"capping knows {', '.join(sorted(CAP_LENGTHS))}")
            caps.append((nd, q))
    kept = list(dict.fromkeys(kept))  # a terminal atom bonded to two kept atoms enters once
    index = {nd: k for k, nd in enumerate(kept)}

    def where(nd):
        return atoms.positions[nd[0]] + np.asarray(nd[1]) @ cell

    pos = [where(nd) for nd in kept]
    syms = [symbols[nd[0]] for nd in kept]
    parent = [nd[0] for nd in kept]
    shifts = [nd[1] for nd in kept]
    cap_of = [-1] * len(kept)
    for host, out in caps:
        x, y = where(host), where(out)
        u = (y - x) / np.linalg.norm(y - x)
        pos.append(x + CAP_LENGTHS[symbols[host[0]]] * u)
        syms.append("H")
        parent.append(-1)
        shifts.append((0, 0, 0))
        cap_of.append(index[host])
    pos = np.asarray(pos, dtype=float)
    cluster = Atoms(syms, positions=pos, pbc=False)
    cluster.arrays["parent_index"] = np.asarray(parent, dtype=int)
    cluster.arrays["parent_shift"] = np.asarray(shifts, dtype=int).reshape(-1, 3)
    cluster.arrays["cap_of"] = np.asarray(cap_of, dtype=int)
    cluster.arrays["in_sphere"] = np.array([nd in sphere for nd in kept] + [False] * len(caps))
    charge = int(round(float(atoms.info.get("charge", 0))))
    cluster.info.update({"cluster_center": int(centre), "cluster_radius": float(radius), "charge": charge,
                         "spin": spin_for(cluster, charge), "cluster_caps": len(caps)})
    for key in ("x", "na_count", "na_sites"):
        if key in atoms.info:
            cluster.info[f"parent_{key}"] = atoms.info[key]
    return cluster


def centres_of(atoms, spec: str) -> list[int]:
    """Centre atoms from a spec: an element symbol ('Na': every Na) or indices ('0,12')."""
    spec = str(spec).strip()
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if parts and all(p.lstrip("-").isdigit() for p in parts):
        idx = [int(p) for p in parts]
        bad = [k for k in idx if not 0 <= k < len(atoms)]
        if bad:
            raise ClusterError(f"centre index {bad[0]} is out of range (the structure has {len(atoms)} atoms)")
        return idx
    from ase.data import chemical_symbols

    if len(parts) != 1 or parts[0] not in chemical_symbols[1:]:
        raise ClusterError(f"cluster centre '{spec}' is neither an element symbol nor atom indices; "
                           "give e.g. Na or 0,12")
    return [k for k, s in enumerate(atoms.get_chemical_symbols()) if s == parts[0]]
