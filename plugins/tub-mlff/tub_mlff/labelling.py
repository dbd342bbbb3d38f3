"""Reference labels (energy, forces, stress, charges) from electronic-structure codes.

* GFN1-/GFN2-xTB through tblite (Bannwarth et al., WIREs Comput. Mol. Sci. 11, e1493 (2021)),
  periodic cells included (Gamma point), with stress;
* all-electron DFT through PySCF on non-periodic clusters (e.g. PBE/def2-SVP).

Both are optional extras: ``pip install tub-mlff[xtb]`` / ``[dft]``. Labels are written to the
extxyz keys tub reads back: info["energy"], arrays["forces"], info["stress"] (3x3, eV/A^3),
info["charge"], info["spin"] (unpaired electrons).
"""

from __future__ import annotations

import numpy as np
from tubcli.errors import TubError

from .structures import spin_for


def _charge_spin(atoms) -> tuple[int, int]:
    charge = int(round(float(atoms.info.get("charge", 0))))
    spin = atoms.info.get("spin")
    spin = spin_for(atoms, charge) if spin is None else int(round(float(spin)))
    return charge, spin


def label_xtb(atoms, method: str = "GFN1-xTB", accuracy: float = 1.0, max_iterations: int = 250,
              electronic_temperature: float = 300.0):
    """Return a copy of ``atoms`` labelled with tblite (energy eV, forces eV/A, stress eV/A^3)."""
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise TubError("xTB labels need tblite; pip install tblite  (or tub-mlff[xtb])") from None
    charge, spin = _charge_spin(atoms)
    out = atoms.copy()
    out.calc = TBLite(method=method, charge=charge, multiplicity=spin + 1, accuracy=accuracy,
                      max_iterations=max_iterations, electronic_temperature=electronic_temperature,
                      verbosity=0)
    energy = out.get_potential_energy()
    forces = out.get_forces()
    stress = out.get_stress(voigt=False) if out.pbc.all() else None
    try:
        charges = out.get_charges()
    except Exception:  # noqa: BLE001 - charges are optional
        charges = None
    return _finish(out, energy, forces, stress, charges, charge, spin, method)


def label_pyscf(atoms, xc: str = "PBE", basis: str = "def2-SVP", max_memory_mb: int = 4000):
    """All-electron Kohn-Sham DFT on a cluster (no periodic cell): energy and forces."""
    if np.any(atoms.pbc):
        raise TubError("PySCF labels are for clusters; give a non-periodic structure (pbc=False)")
    try:
        from pyscf import dft, gto
    except ImportError:
        raise TubError("DFT labels need pyscf; pip install pyscf  (or tub-mlff[dft])") from None
    from ase.units import Bohr, Hartree

    charge, spin = _charge_spin(atoms)
    mol = gto.M(atom=[(s, p) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
                unit="Angstrom", basis=basis, charge=charge, spin=spin, verbose=0, max_memory=max_memory_mb)
    mf = (dft.UKS(mol) if spin else dft.RKS(mol))
    mf.xc = xc
    e = mf.kernel()
    if not mf.converged:
        raise TubError(f"PySCF SCF did not converge for {atoms.get_chemical_formula()}", exit_code=1)
    grad = mf.nuc_grad_method().kernel()
    out = atoms.copy()
    charges = None
    try:
        charges = np.asarray(mf.mulliken_pop(verbose=0)[1])
    except Exception:  # noqa: BLE001
        pass
    return _finish(out, e * Hartree, -np.asarray(grad) * Hartree / Bohr, None, charges, charge, spin,
                   f"{xc}/{basis}")


def _finish(out, energy, forces, stress, charges, charge, spin, method):
    out.calc = None
    out.info["energy"] = float(energy)
    out.arrays["forces"] = np.asarray(forces, dtype=float)
    if stress is not None:
        out.info["stress"] = np.asarray(stress, dtype=float)
    if charges is not None:
        out.arrays["ref_charges"] = np.asarray(charges, dtype=float)
    out.info["charge"] = charge
    out.info["spin"] = spin
    out.info["label_method"] = method
    return out
