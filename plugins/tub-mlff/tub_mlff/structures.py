"""Na_x aminobenzene-functionalised Janus graphene (Na_xAB) cells, built with ASE.

The host of Islas-Vargas et al. (arXiv:2603.22254): graphene with 4-aminophenyl groups
(-C6H4-NH2) bonded covalently to *one* face (hence "Janus"), each on an sp3 carbon that is
pulled slightly out of the sheet. Sodium sits at chosen sites: over an aromatic ring (cation-pi),
at the amine, on the bare graphene of either face, or in the gallery between stacked sheets.

Geometry is idealised (C-C 1.52 A to the ring, aromatic C-C 1.40 A, C-N 1.40 A, C-H 1.08 A,
N-H 1.01 A); relax it with a force field before production use.

``x`` counts Na per aminophenyl group; one host formula unit is C_(2n^2/m) + C6H4NH2 for an
n x n graphene supercell carrying m groups.
"""

from __future__ import annotations

import numpy as np

GRAPHENE_A = 2.46
SITES = ("ring", "amine", "top", "bottom", "gallery", "random")
STACKINGS = ("slab", "gallery", "bilayer")


def _aminophenyl(anchor: np.ndarray, phi: float) -> tuple[list[str], np.ndarray]:
    """Atoms of -C6H4-NH2 standing on ``anchor`` (ring plane rotated by phi about z)."""
    ex = np.array([np.cos(phi), np.sin(phi), 0.0])
    ez = np.array([0.0, 0.0, 1.0])
    ipso = anchor + 1.52 * ez
    centre = ipso + 1.40 * ez
    symbols, pos = [], []
    ring = []
    for k in range(6):
        th = np.pi / 3 * k
        radial = np.sin(th) * ex - np.cos(th) * ez
        p = centre + 1.40 * radial
        ring.append(p)
        symbols.append("C")
        pos.append(p)
        if k in (1, 2, 4, 5):  # ortho/meta H
            symbols.append("H")
            pos.append(p + 1.08 * radial)
    para = ring[3]
    n_pos = para + 1.40 * ez
    symbols.append("N")
    pos.append(n_pos)
    for sgn in (1, -1):
        symbols.append("H")
        pos.append(n_pos + 1.01 * (sgn * np.sin(np.pi / 3) * ex + np.cos(np.pi / 3) * ez))
    return symbols, np.asarray(pos)


MIN_GROUP_GAP = 2.0  # A between atoms of two groups (or of a group and its periodic image): H...H contact
ORIENTATION_TRIES = 200


def _group_gap(cell: np.ndarray, placed: np.ndarray, group: np.ndarray) -> float:
    """Shortest distance from ``group``'s atoms to ``placed`` atoms and to the group's own in-plane periodic
    images (the 3x3 nearest cells, enough for the cells janus_graphene makes)."""
    shifts = [i * cell[0] + j * cell[1] for i in (-1, 0, 1) for j in (-1, 0, 1)]
    best = np.inf
    for s in shifts:
        if len(placed):
            best = min(best, np.linalg.norm(group[:, None] - placed[None] - s, axis=-1).min())
        if np.any(s):
            best = min(best, np.linalg.norm(group[:, None] - group[None] - s, axis=-1).min())
    return float(best)


def janus_graphene(n: int = 4, groups: int = 1, stacking: str = "slab", interlayer: float = 9.5,
                   vacuum: float = 20.0, seed: int = 0):
    """Aminophenyl-functionalised graphene cell (no Na). Returns ASE Atoms with pbc on.

    stacking="slab": one sheet, periodic in-plane, ``vacuum`` cell height;
    stacking="gallery": sheets stacked every ``interlayer`` A, so the groups stand in the gallery;
    stacking="bilayer": two sheets ``interlayer`` apart (Bernal AB registry, ``groups`` each on
    the upper faces, so the lower sheet's groups stand in the gallery between them) with ``vacuum``
    between the upper groups and the periodic image of the lower sheet.

    Atoms come in sheet blocks (info["sheets"] of them, info["block"] atoms each): the sheet's 2 n^2
    carbons, then 13 atoms per group (the 6 ring carbons first). info["groups"] counts the groups
    of the whole cell.
    """
    from ase import Atoms
    from ase.build import graphene

    if n < 2:
        raise ValueError("n must be at least 2")
    if stacking not in STACKINGS:
        raise ValueError(f"stacking must be one of {', '.join(STACKINGS)}")
    sheet = graphene(size=(n, n, 1), vacuum=None)
    sheet.cell[2, 2] = {"slab": vacuum, "gallery": interlayer, "bilayer": interlayer + vacuum}[stacking]
    sheet.pbc = True
    n_c = len(sheet)
    if not 0 <= groups <= n_c // 8:
        raise ValueError(f"at most {n_c // 8} groups fit on a {n}x{n} cell")
    rng = np.random.default_rng(seed)
    # spread anchors on one sublattice, as far apart as possible (farthest-point sampling)
    cand = np.arange(0, n_c, 2)
    anchors: list[int] = []
    if groups:
        anchors.append(int(cand[0]))
        frac = sheet.get_scaled_positions()
        while len(anchors) < groups:
            d = frac[cand][:, None, :2] - frac[anchors][None, :, :2]
            d -= np.round(d)
            dist = np.linalg.norm(d @ sheet.cell.array[:2, :2], axis=-1).min(1)
            anchors.append(int(cand[int(np.argmax(dist))]))
    positions = sheet.positions.copy()
    positions[:, 2] = 0.0
    symbols = list(sheet.get_chemical_symbols())
    positions[anchors, 2] += 0.30  # sp3 pucker
    for _ in range(ORIENTATION_TRIES):  # random ring orientations, drawn again until no two groups clash
        placed = [_aminophenyl(positions[a], phi=rng.uniform(0, np.pi)) for a in anchors]
        if all(_group_gap(sheet.cell.array, np.vstack([p for _, p in placed[:k]] or [np.zeros((0, 3))]), p)
               >= MIN_GROUP_GAP for k, (_, p) in enumerate(placed)):
            break
    else:
        raise ValueError(f"{groups} aminophenyl groups do not fit on a {n}x{n} sheet without two of them coming "
                         f"closer than {MIN_GROUP_GAP:g} A; give fewer --groups or a larger --n")
    for s, p in placed:
        symbols += s
        positions = np.vstack([positions, p])
    atoms = Atoms(symbols, positions=positions, cell=sheet.cell, pbc=True)
    block = len(atoms)
    if stacking == "bilayer":  # a copy of the sheet one interlayer up, AB-shifted by one C-C bond
        top = atoms.copy()
        bond = sheet.positions[1] - sheet.positions[0]  # the two basis atoms of the primitive cell
        top.positions += [bond[0], bond[1], interlayer]
        atoms += top
        anchors = anchors + [a + block for a in anchors]
    if stacking in ("slab", "bilayer"):
        atoms.positions[:, 2] += 0.5 * (vacuum - 6.5)  # lowest sheet low in the box, groups above
    atoms.info["anchors"] = anchors
    atoms.info["groups"] = len(anchors)
    atoms.info["stacking"] = stacking
    atoms.info["n"] = n
    atoms.info["sheets"] = 2 if stacking == "bilayer" else 1
    atoms.info["block"] = block
    return atoms


def _sheets(host) -> tuple[list[float], list[tuple[np.ndarray, np.ndarray]]]:
    """z of every sheet and (centre, unit normal) of every group ring of a ``janus_graphene`` cell."""
    n_c = 2 * host.info.get("n", 4) ** 2
    sheets = int(host.info.get("sheets", 1))
    block = int(host.info.get("block", len(host)))
    per_sheet = int(host.info.get("groups", 0)) // sheets
    z, rings = [], []
    for sh in range(sheets):
        start = sh * block
        z.append(float(np.median(host.positions[start:start + n_c, 2])))
        for g in range(per_sheet):
            first = start + n_c + 13 * g
            ring_idx = [first + i for i in range(13) if host[first + i].symbol == "C"][:6]
            centre = host.positions[ring_idx].mean(0)
            normal = np.cross(host.positions[ring_idx[1]] - centre, host.positions[ring_idx[0]] - centre)
            rings.append((centre, normal / np.linalg.norm(normal)))
    return z, rings


RESTARTS, TRIES_PER_ATOM = 50, 500  # placement starts, and draws for one Na before a start is given up


def add_sodium(host, count: int, sites: str = "random", seed: int = 0, min_distance: float = 2.3):
    """Place ``count`` Na atoms at ``sites`` (one of SITES); returns a new Atoms."""
    from ase import Atoms

    if sites not in SITES:
        raise ValueError(f"sites must be one of {SITES}")
    atoms = host.copy()
    rng = np.random.default_rng(seed)
    sheet_z, ring_centres = _sheets(host)
    z_sheet, z_top = sheet_z[0], sheet_z[-1]
    amines = [atoms.positions[k] for k, sym in enumerate(atoms.get_chemical_symbols()) if sym == "N"]
    cell = atoms.cell.array
    c = cell[2, 2]
    if sites == "ring" and count > 2 * len(ring_centres):  # one Na over each face of each group ring
        raise ValueError(f"{count} Na do not fit at 'ring' sites: this cell has {len(ring_centres)} group ring(s), "
                         f"so at most {2 * len(ring_centres)} ring sites; use more --groups or other --sites")
    # random sequential placement; when the atoms placed so far leave no room for the next one (an unlucky
    # first Na over a ring takes the spot a second needs), start again from the host: any seed builds the cell
    for _restart in range(RESTARTS):
        atoms, placed, stuck = host.copy(), [], 0
        while len(placed) < count and stuck < TRIES_PER_ATOM:
            stuck += 1
            kind = sites
            if kind == "random":
                kind = rng.choice(["ring", "amine", "top", "bottom"] if ring_centres else ["top", "bottom"])
            if kind == "ring" and ring_centres:
                centre, normal = ring_centres[rng.integers(len(ring_centres))]
                p = centre + rng.choice([-1, 1]) * 2.45 * normal + rng.normal(scale=0.2, size=3)
            elif kind == "amine" and amines:
                p = amines[rng.integers(len(amines))] + 2.4 * _unit(rng.normal(size=3) * [1, 1, 0.3])
            elif kind == "gallery":  # midway between two sheets (a slab: 3.2 A above its sheet)
                p = rng.uniform(0, 1, 3) @ cell
                p[2] = {"gallery": z_sheet + 0.5 * c, "bilayer": 0.5 * (z_sheet + z_top)}.get(
                    host.info.get("stacking"), z_sheet + 3.2)
            elif kind == "bottom":
                p = rng.uniform(0, 1, 3) @ cell
                p[2] = z_sheet - 2.3
            else:  # top face (of the upper sheet), between groups
                p = rng.uniform(0, 1, 3) @ cell
                p[2] = z_top + 2.3
            trial = atoms + Atoms("Na", positions=[p])
            d = trial.get_distances(len(trial) - 1, range(len(trial) - 1), mic=True)
            need = np.where(np.array(trial.get_chemical_symbols()[:-1]) == "Na", 3.0, min_distance)
            if np.all(d > need):
                atoms, stuck = trial, 0
                placed.append(kind)
        if len(placed) == count:
            break
    else:
        raise ValueError(f"could not place {count} Na at '{sites}' sites without overlaps ({RESTARTS} starts); use "
                         "fewer")
    atoms.info["na_sites"] = ",".join(placed)
    return atoms


def _unit(v):
    return v / np.linalg.norm(v)


def spin_for(atoms, charge: int = 0) -> int:
    """Unpaired electrons of the lowest spin state allowed by the electron count (0 or 1)."""
    return int((int(atoms.numbers.sum()) - int(charge)) % 2)


def host_formula(n: int, groups: int) -> str:
    """Formula of one host unit (per aminophenyl group) for capacities."""
    carbons = 2 * n * n // max(groups, 1)
    return f"C{carbons + 6}H6N"


def close_contact(atoms, apart, factor: float = 1.3):
    """The closest pair of ``atoms`` that is not bonded in ``apart`` (the same cell built with its
    sheets and images far apart: same atoms, same order), as (i, j, distance), if it is closer
    than ``factor`` × the sum of covalent radii; else None. A gallery too narrow for the
    aminophenyl groups pushes them through the next sheet: C–N 0.8 Å at 6.5 Å, C···H 1.2 Å at 7.5 Å."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    def pairs(a, cutoff):
        i, j, d = neighbor_list("ijd", a, cutoff)
        return i, j, d, covalent_radii[a.numbers[i]] + covalent_radii[a.numbers[j]]

    i, j, d, r = pairs(apart, 3.0)
    bonded = set(zip(i[d < 1.25 * r].tolist(), j[d < 1.25 * r].tolist()))
    i, j, d, r = pairs(atoms, 4.0)
    free = np.array([(a, b) not in bonded for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
    if not free.any():
        return None
    ratio = np.where(free, d / r, np.inf)
    k = int(ratio.argmin())
    return (int(i[k]), int(j[k]), float(d[k])) if ratio[k] < factor else None

