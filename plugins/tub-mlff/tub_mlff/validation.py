"""Checks on structures before a model sees them, each failing with a one-line TubError."""

from __future__ import annotations

import numpy as np
from tubcli.errors import TubError

from .elements import ZMAX

MIN_DISTANCE = 0.5  # Angstrom; closer atoms are treated as overlapping


def check_structure(atoms, elements: set[int] | None = None, name: str = "structure",
                    min_distance: float = MIN_DISTANCE, fix: str = "fix the geometry", model: bool = True) -> None:
    """Raise TubError for non-finite or overlapping atoms, unknown elements, or a bad periodic cell.

    ``model``: the structure is for a SpookyNet model, whose element tables end at Rn (``ZMAX``), whatever
    ``elements`` says (``label``, whose DFT covers heavier elements, passes False).
    A cell vector may be zero only along a non-periodic direction (e.g. a sheet periodic in x and
    y with c = 0, as ``ase.build.graphene(vacuum=None)`` makes): that direction is open.
    """
    from .neighbors import close_pairs, neighbor_list

    check_atoms(atoms, name)
    if not (np.isfinite(atoms.positions).all() and np.isfinite(np.asarray(atoms.cell)).all()):
        raise TubError(f"{name} has non-finite (NaN or inf) coordinates or cell; fix the structure")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        check_cell(atoms.cell, pbc, name)
    heavy = sorted(set(int(z) for z in atoms.numbers if z >= ZMAX)) if model else []
    if heavy:
        from ase.data import chemical_symbols

        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in heavy)
        raise TubError(f"{name} contains {names}, beyond Rn (Z={ZMAX - 1}) where SpookyNet's element tables end; "
                       "leave out the structures with elements heavier than Rn")
    if elements is not None:
        bad = sorted(set(int(z) for z in atoms.numbers) - set(elements))
        if bad:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in bad)
            known = ", ".join(chemical_symbols[z] for z in sorted(elements)) if len(elements) < 20 else "its training elements"
            raise TubError(f"{name} contains {names}, which the model was not trained on "
                           f"(it knows {known}); use a model trained on these elements")
    pos = atoms.get_positions()
    if pbc.any():
        i, j, _, d = neighbor_list(pos, atoms.cell, pbc, min_distance)
        # exact duplicates (d == 0) are missed by the sparse search; look for them directly
        if len(i) == 0:
            frac = atoms.get_scaled_positions(wrap=True)
            dup = close_pairs(frac @ np.asarray(atoms.cell), 1e-8)
            if len(dup):
                i, j, d = dup[:, 0], dup[:, 1], np.zeros(len(dup))
    else:
        pairs = close_pairs(pos, min_distance)
        i, j = (pairs[:, 0], pairs[:, 1]) if len(pairs) else (np.zeros(0, int), np.zeros(0, int))
        d = np.linalg.norm(pos[j] - pos[i], axis=1) if len(i) else np.zeros(0)
    if len(i):
        k = int(np.argmin(d))
        raise TubError(f"{name}: atoms {int(i[k])} and {int(j[k])} overlap ({d[k]:.3f} A apart, "
                       f"minimum {min_distance} A); {fix}")


def check_atoms(atoms, name: str = "structure") -> None:
    """TubError for a structure without atoms: checked before anything that counts its electrons."""
    if len(atoms) == 0:
        raise TubError(f"{name} has no atoms; give a structure with at least one atom")


def check_cell(cell, pbc, name: str = "structure") -> None:
    """TubError unless every periodic direction has a cell vector and the periodic vectors span a lattice."""
    from ase.geometry import complete_cell

    cell = np.asarray(cell, dtype=float)
    empty = np.linalg.norm(cell, axis=1) < 1e-6
    if (empty & pbc).any():
        axes = ", ".join("abc"[k] for k in range(3) if empty[k] and pbc[k])
        raise TubError(f"{name} is periodic (pbc={pbc.tolist()}) but has no cell vector {axes}; "
                       "set a Lattice= in the extxyz header or turn pbc off along it")
    if abs(np.linalg.det(complete_cell(cell))) < 1e-6:
        raise TubError(f"{name} has a degenerate cell (its vectors are linearly dependent); fix the Lattice= "
                       "in the extxyz header")


def check_charge_spin(atoms, charge: float, spin: float | None, name: str = "structure") -> tuple[int, int]:
    """The total charge and unpaired-electron count as integers, or a one-line TubError when they are
    impossible for this structure's electron count (fractional, negative electron count, or a spin whose
    parity or size the electrons cannot make). ``spin`` None: the lowest state the count allows (0 or 1)."""
    check_atoms(atoms, name)  # else "spin 1 is impossible with 0 electrons"
    formula = atoms.get_chemical_formula()
    if abs(float(charge) - round(float(charge))) > 1e-6:
        raise TubError(f"{name} ({formula}): total charge {charge} is not a whole number of electrons; "
                       "give an integer charge")
    q = int(round(float(charge)))
    n_electrons = int(atoms.numbers.sum()) - q
    if n_electrons < 0:
        raise TubError(f"{name} ({formula}): charge {q} removes more electrons than its "
                       f"{int(atoms.numbers.sum())}; give a charge of at most {int(atoms.numbers.sum())}")
    if spin is None:
        return q, n_electrons % 2
    if abs(float(spin) - round(float(spin))) > 1e-6:
        raise TubError(f"{name} ({formula}): spin {spin} is not a whole number of unpaired electrons; "
                       f"give {n_electrons % 2}, {n_electrons % 2 + 2}, ...")
    s = int(round(float(spin)))
    if s < 0 or s > n_electrons or (n_electrons - s) % 2:
        raise TubError(f"{name} ({formula}): spin {s} (unpaired electrons) is impossible with {n_electrons} "
                       f"electrons (charge {q}); give {n_electrons % 2}, {n_electrons % 2 + 2}, ...")
    return q, s
