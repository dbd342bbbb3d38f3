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

from .validation import check_charge_spin


def _charge_spin(atoms) -> tuple[int, int]:
    """info['charge'] and info['spin'] (unpaired electrons), checked. Without info['spin'], ASE's initial
    magnetic moments give it (|sum| in Bohr magnetons = unpaired electrons: O2 from ase.build is a triplet),
    else the lowest state the electron count allows."""
    spin = atoms.info.get("spin")
    if spin is None and atoms.has("initial_magmoms"):
        moments = atoms.get_initial_magnetic_moments()
        if moments.ndim == 1 and np.any(moments):  # (collinear moments only)
            spin = int(round(abs(float(moments.sum()))))
    return check_charge_spin(atoms, atoms.info.get("charge", 0), spin)


def require_tblite():
    """tblite's ASE calculator class, or a one-line TubError when tblite is not installed."""
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise TubError("xTB needs tblite; pip install tblite  (or tub-mlff[xtb])") from None
    return TBLite


def xtb_calculator(atoms, method: str = "GFN1-xTB", accuracy: float = 1.0, max_iterations: int = 250,
                   electronic_temperature: float = 300.0):
    """A tblite calculator for ``atoms``' charge and spin (as ``label_xtb`` labels)."""
    charge, spin = _charge_spin(atoms)
    return require_tblite()(method=method, charge=charge, multiplicity=spin + 1, accuracy=accuracy,
                            max_iterations=max_iterations, electronic_temperature=electronic_temperature,
                            verbosity=0)


def label_xtb(atoms, method: str = "GFN1-xTB", accuracy: float = 1.0, max_iterations: int = 250,
              electronic_temperature: float = 300.0):
    """Return a copy of ``atoms`` labelled with tblite (energy eV, forces eV/A, stress eV/A^3)."""
    charge, spin = _charge_spin(atoms)
    out = atoms.copy()
    out.calc = xtb_calculator(atoms, method, accuracy, max_iterations, electronic_temperature)
    from ase.calculators.calculator import CalculationFailed

    try:
        energy = out.get_potential_energy()
        forces = out.get_forces()
    except CalculationFailed as exc:
        raise TubError(f"tblite failed on {atoms.get_chemical_formula()} ({method}): {exc}", exit_code=1) from None
    stress = out.get_stress(voigt=False) if out.pbc.all() else None
    try:
        charges = out.get_charges()
    except Exception:  # noqa: BLE001 - charges are optional
        charges = None
    labelled = _finish(out, energy, forces, stress, charges, charge, spin, method)
    labelled.info["label_settings"] = (f"tblite accuracy={accuracy:g} electronic_temperature={electronic_temperature:g}K "
                                       f"max_iterations={max_iterations}")
    return labelled


def check_dft_settings(xc: str, basis: str, elements) -> None:
    """One-line TubError unless PySCF knows the functional and has the basis for every element."""
    import warnings

    try:
        from pyscf import gto
        from pyscf.dft import libxc
    except ImportError:
        raise TubError("DFT labels need pyscf; pip install pyscf  (or tub-mlff[dft])") from None
    try:
        libxc.parse_xc(xc)
    except Exception:  # noqa: BLE001 - PySCF raises KeyError/ValueError for unknown names
        raise TubError(f"PySCF does not know the functional '{xc}'; give e.g. PBE, B3LYP, PBE0 or r2SCAN") from None
    for el in sorted(elements):
        try:
            with warnings.catch_warnings():  # an unknown basis also warns about basis-set-exchange
                warnings.simplefilter("ignore")
                shells = gto.basis.load(basis, el)
        except Exception:  # noqa: BLE001
            shells = None
        if not shells:
            raise TubError(f"PySCF has no basis '{basis}' for {el}; give a basis PySCF knows for it, e.g. def2-SVP")
        try:
            core = gto.basis.load_ecp(basis, el)  # def2 past Kr: valence shells made for a core potential
        except Exception:  # noqa: BLE001 - a basis without ECP data
            core = None
        if core:
            raise TubError(f"the '{basis}' basis of {el} is made for an effective core potential, and the labels are "
                           f"all-electron (without its ECP the energies and forces are wrong); give an all-electron "
                           f"basis for {el} with --basis, e.g. ANO-RCC or dyall-v2z")


def label_pyscf(atoms, xc: str = "PBE", basis: str = "def2-SVP", density_fit: bool = False,
                conv_tol: float = 1e-9, max_cycle: int = 50, max_memory_mb: int = 4000,
                grid_level: int = 3):
    """All-electron Kohn-Sham DFT on a cluster (no periodic cell) with PySCF: energy and forces.

    PySCF (Sun et al., J. Chem. Phys. 153, 024109 (2020)) works in Hartree and Bohr: E[eV] =
    E_h x 27.2114, F[eV/A] = -dE/dR[E_h/bohr] x 27.2114 / 0.529177. Charge and spin come from
    ``atoms.info`` (spin = unpaired electrons = 2S = n_alpha - n_beta; missing spin = the lowest
    allowed by the electron count); spin > 0 runs unrestricted Kohn-Sham (UKS), spin 0 restricted
    (RKS). The SCF is DIIS; if it stalls, the same functional is converged with the second-order
    (Newton) solver from where DIIS stopped; no convergence after that is an error. Mulliken
    charges go to arrays["ref_charges"]; UKS adds info["s_squared"] (<S^2>, ideal S(S+1)).
    ``density_fit`` uses RI-J with the basis' default auxiliary set: faster, the energy shifts slightly
    from the exact-integral one, and the forces are the analytic derivatives of the fitted energy.
    """
    if np.any(atoms.pbc):
        raise TubError("PySCF labels are for clusters; give a non-periodic structure (pbc=False) "
                       "or carve clusters with --cluster-radius")
    try:
        from pyscf import dft, gto
    except ImportError:
        raise TubError("DFT labels need pyscf; pip install pyscf  (or tub-mlff[dft])") from None
    from ase.units import Bohr, Hartree

    charge, spin = _charge_spin(atoms)
    name = atoms.get_chemical_formula()
    check_dft_settings(xc, basis, set(atoms.get_chemical_symbols()))
    mol = gto.M(atom=[(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
                unit="Angstrom", basis=basis, charge=charge, spin=spin, verbose=0, max_memory=max_memory_mb)
    mf = dft.UKS(mol) if spin else dft.RKS(mol)
    mf.xc = xc
    mf.conv_tol = conv_tol
    mf.max_cycle = max_cycle
    mf.grids.level = grid_level
    if density_fit:
        mf = mf.density_fit()
    try:
        e = mf.kernel()
        solver = "diis"
        if not mf.converged:
            dm = mf.make_rdm1()
            mf = mf.newton()
            mf.max_cycle = max(max_cycle, 50)
            e = mf.kernel(dm)
            solver = "newton"
    except (KeyError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TubError(f"PySCF failed on {name} with xc '{xc}' ({msg}); check the functional name") from None
    if not mf.converged:
        raise TubError(f"PySCF SCF did not converge for {name} ({xc}/{basis}); check charge/spin or the "
                       "geometry", exit_code=1)
    grad = mf.nuc_grad_method().kernel()
    out = atoms.copy()
    charges = np.asarray(mf.mulliken_pop(verbose=0)[1], dtype=float)
    labelled = _finish(out, e * Hartree, -np.asarray(grad) * Hartree / Bohr, None, charges, charge, spin,
                       f"{xc}/{basis}" + ("/RI" if density_fit else ""))
    labelled.info["scf_solver"] = solver
    labelled.info["label_settings"] = (f"pyscf {'UKS' if spin else 'RKS'} conv_tol={conv_tol:g} grid_level={grid_level} "
                                       f"max_cycle={max_cycle}" + (" density_fit" if density_fit else ""))
    if spin:
        labelled.info["s_squared"] = float(mf.spin_square()[0])
    return labelled


def _finish(out, energy, forces, stress, charges, charge, spin, method):
    out.calc = None
    out.info.pop("predicted_by", None)  # an MD frame's model predictions are replaced by these labels
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
