"""Element data: symbols, masses (via ASE) and the ground-state electron configurations.

The electron-configuration table c(Z) feeds SpookyNet's nuclear embedding (Unke et al. 2021,
Eq. 3 of Methods): 20 columns (Z; occupations 1s 2s 2p 3s 3p 4s 3d 4p 5s 4d 5p 6s 4f 5d 6p;
valence s, p, d, f), each divided by its column maximum. It is generated here by Madelung
filling, so freshly initialised models do not need any third-party table. Models loaded from a
reference checkpoint use the table stored in that checkpoint instead.
"""

from __future__ import annotations

import numpy as np

ZMAX = 87  # element tables have rows 0..86 (0 is a padding row)

_ORBITALS = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (3, 2), (4, 1), (5, 0), (4, 2),
             (5, 1), (6, 0), (4, 3), (5, 2), (6, 1)]  # Madelung order, as the table's columns


def electron_configuration_table(zmax: int = ZMAX) -> np.ndarray:
    """Normalised [zmax, 20] table of electron configurations (float64)."""
    table = np.zeros((zmax, 20), dtype=np.float64)
    for z in range(1, zmax):
        occ = np.zeros(len(_ORBITALS))
        left = z
        for k, (_, l) in enumerate(_ORBITALS):
            take = min(left, 2 * (2 * l + 1))
            occ[k] = take
            left -= take
        n_max = max(n for (n, l), o in zip(_ORBITALS, occ) if o > 0 and l == 0)
        val = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
        for (n, l), o in zip(_ORBITALS, occ):
            if (l in (0, 1) and n == n_max) or (l == 2 and n == n_max - 1) or (l == 3 and n == n_max - 2):
                val[l] = o
        # closed d / f shells below a p-block valence shell are core, not valence
        if val[1] > 0 and val[2] == 10:
            val[2] = 0.0 if z <= 36 else val[2]
        table[z, 0] = z
        table[z, 1:16] = occ
        table[z, 16:20] = [val[0], val[1], val[2], val[3]]
    colmax = table.max(axis=0)
    colmax[colmax == 0] = 1.0
    return table / colmax


def atomic_masses() -> np.ndarray:
    from ase.data import atomic_masses as masses

    return np.asarray(masses[:ZMAX], dtype=np.float64)


def symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]
