"""Battery-electrode quantities from energies: capacity, formation energy, convex hull, OCV.

Conventions as in Islas-Vargas et al., arXiv:2603.22254 and standard anode studies (e.g. Aydinol
et al., PRB 56, 1354 (1997) for the hull voltage):

* formation energy per host formula unit  E_f(x) = E(Na_x Host) - E(Host) - x mu_Na,
  mu_Na the energy per atom of bcc Na with the same potential;
* open-circuit voltage between adjacent vertices of the lower convex hull of E_f(x):
  V = -(E_f(x2) - E_f(x1)) / (x2 - x1) / e  (volts vs Na/Na+; V <= 0 means Na plating);
* gravimetric capacity C = x_max n F / (3.6 M_host) mAh/g, F/3.6 = 26801.48 mAh/mol.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FARADAY = 96485.33212  # C/mol
MAH_PER_MOL = FARADAY / 3.6  # 26801.48 mAh per mol of electrons


def molar_mass(formula: str) -> float:
    """Molar mass (g/mol) of a chemical formula such as 'C6' or 'C6H4NH2'."""
    from ase.data import atomic_masses
    from ase.formula import Formula

    counts = Formula(formula).count()
    from ase.data import atomic_numbers

    return float(sum(atomic_masses[atomic_numbers[s]] * n for s, n in counts.items()))


def capacity_mah_per_g(x_max: float, host_molar_mass: float, electrons_per_ion: int = 1) -> float:
    """Theoretical gravimetric capacity of a host storing x_max ions per formula unit (mAh/g)."""
    if host_molar_mass <= 0:
        raise ValueError("host molar mass must be positive")
    return MAH_PER_MOL * electrons_per_ion * float(x_max) / float(host_molar_mass)


def formation_energy(e_loaded, e_host: float, x, mu_ion: float):
    """E_f(x) = E(Na_x Host) - E(Host) - x mu_Na (eV per host formula unit)."""
    return np.asarray(e_loaded, dtype=float) - e_host - np.asarray(x, dtype=float) * mu_ion


def lower_convex_hull(x, e) -> np.ndarray:
    """Indices of the vertices of the lower convex hull of points (x, e), sorted by x.

    Andrew's monotone chain on the lower side; of points with equal x only the lowest counts.
    Collinear interior points are not vertices.
    """
    x = np.asarray(x, dtype=float)
    e = np.asarray(e, dtype=float)
    order = np.lexsort((e, x))
    hull: list[int] = []
    last_x = None
    for k in order:
        if last_x is not None and x[k] == last_x:
            continue  # a higher point at the same composition
        last_x = x[k]
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (x[b] - x[a]) * (e[k] - e[a]) - (e[b] - e[a]) * (x[k] - x[a])
            if cross <= 0:  # b is on or above the segment a-k
                hull.pop()
            else:
                break
        hull.append(int(k))
    return np.asarray(hull, dtype=int)


@dataclass
class VoltageStep:
    x_start: float
    x_end: float
    voltage: float

    @property
    def plating(self) -> bool:
        return self.voltage <= 0.0


def voltage_profile(x, e_formation) -> list[VoltageStep]:
    """Hull voltages V = -dE_f/dx between adjacent hull vertices (V vs Na/Na+)."""
    x = np.asarray(x, dtype=float)
    e = np.asarray(e_formation, dtype=float)
    idx = lower_convex_hull(x, e)
    steps = []
    for a, b in zip(idx[:-1], idx[1:]):
        steps.append(VoltageStep(float(x[a]), float(x[b]), float(-(e[b] - e[a]) / (x[b] - x[a]))))
    return steps


def energy_above_hull(x, e) -> np.ndarray:
    """Distance of each point above the lower hull (eV per formula unit)."""
    x = np.asarray(x, dtype=float)
    e = np.asarray(e, dtype=float)
    idx = lower_convex_hull(x, e)
    return e - np.interp(x, x[idx], e[idx])


def volume_change(v, v0: float):
    """Relative volume (or interlayer spacing) change (V - V0) / V0."""
    return (np.asarray(v, dtype=float) - v0) / v0


def average_voltage(steps: list[VoltageStep]) -> float:
    """x-weighted mean hull voltage."""
    w = np.array([s.x_end - s.x_start for s in steps])
    v = np.array([s.voltage for s in steps])
    return float((w * v).sum() / w.sum()) if len(steps) else float("nan")


BCC_SCAN = np.round(np.arange(3.8, 6.21, 0.1), 2)  # A: wide, so that a poor Na metal's minimum is bracketed too
BCC_NA_EXPERIMENT = 4.23  # A, bcc Na at low temperature (4.29 A at room temperature)


SEPARATED_NA_LATTICE = 12.0  # A: bcc Na with 10.4 A between neighbours, beyond any short-range cutoff


def bcc_sodium_energy(calc, a: float, repeat: int = 2) -> float:
    """Energy per atom of bcc Na at cubic lattice constant ``a`` (a ``repeat``^3 supercell of the 2-atom cell)."""
    from ase.build import bulk

    atoms = bulk("Na", "bcc", a=float(a), cubic=True).repeat(repeat)
    atoms.calc = calc
    return atoms.get_potential_energy() / len(atoms)


def bcc_sodium_chemical_potential(calc, a_grid=None, repeat: int = 2, lattice: float | None = None
                                  ) -> tuple[float, float]:
    """mu_Na: energy per atom of bcc Na at the lattice constant that minimises it (or at ``lattice``).

    Scans the cubic lattice constant of a ``repeat``^3 supercell of the 2-atom cubic cell (default
    16 atoms: a Gamma-point reference such as tblite needs more than 2 atoms, and the demo model's
    bcc training cells are these) over 3.8-6.2 A and minimises between the grid points around the
    lowest (Brent's method on computed energies, to 1e-4 A). Returns
    (mu, a0); a0 at an end of the grid means the energy was still falling there and mu is the value
    at that end (the caller flags it). A minimum far from experiment's 4.23 A means the potential's
    Na metal is poor (GFN1-xTB's Gamma-point bcc Na has its minimum near 5.7 A): then ``lattice``
    takes mu at a fixed lattice constant instead, the same for every method compared.
    """
    def per_atom(a: float) -> float:
        return bcc_sodium_energy(calc, a, repeat)

    if lattice is not None:
        return float(per_atom(lattice)), float(lattice)
    grid = np.asarray(a_grid if a_grid is not None else BCC_SCAN)
    energies = np.array([per_atom(a) for a in grid])
    k = int(np.argmin(energies))
    if 0 < k < len(grid) - 1:  # bracketed: Brent's method on the computed energies between the neighbours
        from scipy.optimize import minimize_scalar

        best = minimize_scalar(per_atom, bounds=(grid[k - 1], grid[k + 1]), method="bounded",
                               options={"xatol": 1e-4})
        if best.fun <= energies[k]:  # a computed energy, not a fitted curve's (a parabola over +-0.2 A
            return float(best.fun), float(best.x)  # undershot the model's minimum by 0.3 meV/atom)
    return float(energies[k]), float(grid[k])


CELL_MASKS = {"c": [0, 0, 1, 0, 0, 0], "full": None}  # Voigt strain components the relaxation may change


def relax(atoms, calc, steps: int, fmax: float, cell: str = "fixed", stress_tol: float = 0.02):
    """BFGS relaxation; returns (relaxed copy, energy). The copy's ``info`` records whether it
    converged (``relax_converged``) and its residual max force (eV/A) and stress (GPa).

    ``cell``: "fixed" moves the atoms only; "c" also the stacking axis under zero stress (the
    interlayer spacing of a layered host: the Δd/d of sodiation); "full" every cell parameter.
    The cell moves through ASE's FrechetCellFilter, whose cell "forces" are the virial V·σ over
    ``exp_cell_factor``: it is set so that ``fmax`` on them means |σ| ≤ ``stress_tol`` GPa (ASE's
    default, the atom count, would leave ~0.5 GPa in a 30-atom cell: a percent of volume, more
    than the volume changes of sodiation being measured).
    """
    from ase import units

    a = atoms.copy()
    a.calc = calc
    if steps <= 0:  # single points
        return _detached(a)
    from ase.optimize import BFGS

    target = a
    if cell != "fixed":
        from ase.filters import FrechetCellFilter

        factor = stress_tol * units.GPa * a.get_volume() / fmax
        target = FrechetCellFilter(a, mask=CELL_MASKS[cell], exp_cell_factor=factor)
    a.info["relax_converged"] = bool(BFGS(target, logfile=None).run(fmax=fmax, steps=steps))
    a.info["relax_max_force_eV_A"] = float(np.linalg.norm(a.get_forces(), axis=1).max()) if len(a) else 0.0
    if cell != "fixed":
        relaxed = np.asarray(CELL_MASKS[cell] or [1] * 6, dtype=bool)
        a.info["relax_max_stress_GPa"] = float(np.abs(a.get_stress()[relaxed]).max() / units.GPa)
    return _detached(a)


def _detached(a):
    """(a, energy) with its results kept on a single-point calculator: the calculator that computed it
    is shared by the series and takes the next frame's spin, so asking it again later would
    recompute this structure with another frame's spin."""
    from ase.calculators.singlepoint import SinglePointCalculator

    energy = float(a.get_potential_energy())
    kept = {k: a.calc.results[k] for k in ("forces", "stress") if k in a.calc.results}  # those of `a` too
    a.calc = SinglePointCalculator(a, energy=energy, **kept)
    return a, energy


def _sodium_counts(frames, na_symbol: str = "Na") -> list[int]:
    counts = [sum(1 for s in f.get_chemical_symbols() if s == na_symbol) for f in frames]
    if 0 not in counts:
        raise ValueError("the structures need the bare host (a frame without Na)")
    return counts


def interlayer_spacing(atoms, cell_relaxed: bool) -> float:
    """The interlayer spacing d (A) of a layered host, for Δd/d (spec §2.8): the distance between the
    mean planes of the two sheets of a ``janus_graphene`` bilayer (whatever the cell does); the c
    length of a periodic stack whose cell was relaxed. NaN where there is none to measure: a single
    sheet in vacuum, or a stack held at a fixed cell (its d is the input's by construction)."""
    stacking = atoms.info.get("stacking")
    if stacking == "bilayer" and {"n", "block"} <= set(atoms.info):
        sheet = np.arange(2 * int(atoms.info["n"]) ** 2)  # each sheet block starts with its carbons
        z = atoms.positions[:, 2]
        return float(z[sheet + int(atoms.info["block"])].mean() - z[sheet].mean())
    if stacking == "slab" or not cell_relaxed or not atoms.pbc[2]:
        return float("nan")
    return float(np.linalg.norm(atoms.cell[2]))


def hull_report(structures, energies, mu_na: float, na_symbol: str = "Na", cell_relaxed: bool = False,
                per_x: str = "lowest") -> dict:
    """Formation energies, hull, voltages, capacity and volume change of Na_x host structures.

    ``structures`` (with their ``energies``) must contain the bare host (no Na) and loaded cells of
    the same host; x is Na per aminophenyl group (``info['groups']``, default 1). ``per_x``: the
    ``lowest`` energy per x (relaxed structures: several site sets sample the configurations) or the
    ``mean`` over the frames of each x (MD frames: the finite-T potential energy, ΔG ≈ ΔU, spec §2.8;
    with their mean volume and spacing, so NPT frames give ΔV/V₀ from NPT). ΔV/V needs cells that
    could change (relaxed, given with different volumes, or varying over the frames); NaN otherwise, as 0
    would be by construction.
    """
    counts = _sodium_counts(structures, na_symbol)
    host = structures[counts.index(0)]
    groups = int(host.info.get("groups", 1)) or 1
    by_count: dict[int, list] = {}
    for a, e, c in zip(structures, energies, counts):
        by_count.setdefault(c, []).append((a, float(e)))
    if per_x == "mean":
        chosen = by_count
        # per x: did its cell move (NPT frames)? an NVT group's volume is its input cell's, not a measurement
        moved = {c: cell_relaxed or (len(g) > 1 and np.ptp([a.get_volume() for a, _ in g]) > 1e-9)
                 for c, g in by_count.items()}
    else:
        chosen = {c: [min(g, key=lambda ae: ae[1])] for c, g in by_count.items()}
        # cells relaxed here, or given with volumes that differ (relaxed elsewhere: DFT, an earlier ocv run)
        given = [a.get_volume() for a in structures] if host.pbc.all() else [0.0]
        moved = dict.fromkeys(by_count, cell_relaxed or np.ptp(given) > 1e-9 * max(given))
    lowest, volumes, spacings = {}, {}, {}
    for c, g in chosen.items():
        lowest[c] = float(np.mean([e for _, e in g]))
        volumes[c] = float(np.mean([a.get_volume() for a, _ in g])) if host.pbc.all() and moved[c] else float("nan")
        spacings[c] = float(np.mean([interlayer_spacing(a, moved[c]) for a, _ in g]))
    cs = np.array(sorted(lowest))
    x = cs / groups
    ef = formation_energy([lowest[c] for c in cs], lowest[0], cs, mu_na) / groups
    steps = voltage_profile(x, ef)
    host_mass = molar_mass(host[[k for k in range(len(host)) if host[k].symbol != na_symbol]].get_chemical_formula()) / groups
    positive = [s for s in steps if s.voltage > 0]
    x_max = max((s.x_end for s in positive), default=0.0)
    plating = [s.x_start for s in steps if s.plating]
    return {"x": x.tolist(), "formation_energy_eV": ef.tolist(), "mu_na_eV": mu_na, "energy_per_x": per_x,
            "hull_vertices": lower_convex_hull(x, ef).tolist(),
            "steps": [{"x_start": s.x_start, "x_end": s.x_end, "voltage_V": s.voltage, "plating": s.plating}
                      for s in steps],
            "average_voltage_V": average_voltage(positive) if positive else float("nan"),
            "plating_from_x": min(plating) if plating else None,  # V <= 0: Na plates instead of inserting
            "x_max_before_plating": x_max, "host_molar_mass_g_mol": host_mass,
            "capacity_mAh_g": capacity_mah_per_g(x_max, host_mass),
            # no plating up to the largest x sampled: the capacity is a lower bound set by the sampling
            "capacity_limited_by_sampled_x": bool(not plating and len(x) and x_max >= float(x.max())),
            "capacity_per_x_mAh_g": capacity_mah_per_g(1.0, host_mass),
            "volume_change": {str(c): float(volume_change(volumes[c], volumes[0])) for c in cs},
            "spacing_change": {str(c): float(volume_change(spacings[c], spacings[0])) for c in cs}}


def sodiation_series(frames, calc_for, relax_steps: int = 50, fmax: float = 0.05, mu_na: float | None = None,
                     na_symbol: str = "Na", cell: str = "fixed", mu_na_lattice: float | None = None,
                     stress_tol: float = 0.02, temperature_K: float | None = None) -> tuple[dict, list]:
    """Relax every frame with ``calc_for(frame)`` and report the hull (``hull_report``).

    ``calc_for(None)`` gives the calculator of the bcc Na reference (unless ``mu_na`` is given).
    ``temperature_K``: the frames are MD frames at that temperature (with ``relax_steps`` 0): the mean
    energy per x, against μ_Na(T) = μ_Na + 3/2 k_B T, the potential energy per atom of harmonic bcc
    Na at T, so that the thermal energy of the inserted atoms cancels as it does in the hosts.
    Returns (report, relaxed structures in the order of ``frames``).
    """
    _sodium_counts(frames, na_symbol)
    relaxed = [relax(f, calc_for(f), relax_steps, fmax, cell, stress_tol) for f in frames]
    a0 = None
    if mu_na is None:
        mu_na, a0 = bcc_sodium_chemical_potential(calc_for(None), lattice=mu_na_lattice)
    mu_static = mu_na
    if temperature_K is not None:
        from ase import units

        mu_na = mu_na + 1.5 * units.kB * temperature_K
    structures = [a for a, _ in relaxed]
    cell_relaxation = cell if relax_steps > 0 else "fixed"
    report = hull_report(structures, [e for _, e in relaxed], mu_na, na_symbol,
                         cell_relaxed=cell_relaxation != "fixed", per_x="lowest" if temperature_K is None else "mean")
    report["cell_relaxation"] = cell_relaxation
    if temperature_K is not None:
        report.update(temperature_K=temperature_K, cell_relaxation="none (MD frames)")
    if relax_steps > 0:  # what the energies and volumes rest on, per structure in the given order
        report["relaxation"] = [{k: a.info[k] for k in ("relax_converged", "relax_max_force_eV_A",
                                                         "relax_max_stress_GPa") if k in a.info} for a in structures]
        report["relaxations_unconverged"] = sum(not a.info["relax_converged"] for a in structures)
    if a0 is not None and mu_na_lattice is None:  # how strongly the potential binds its Na metal (expt 1.11 eV)
        report["na_cohesive_energy_eV"] = bcc_sodium_energy(calc_for(None), SEPARATED_NA_LATTICE) - mu_static
    if a0 is not None:  # a minimum at the edge of the lattice scan is not a minimum: say so
        report.update(mu_na_lattice_A=a0, mu_na_choice="fixed lattice" if mu_na_lattice is not None else "minimum",
                      mu_na_at_scan_edge=bool(mu_na_lattice is None and (a0 <= BCC_SCAN[0] or a0 >= BCC_SCAN[-1])))
    return report, structures


def voltage_at(steps: list[dict], x: float) -> float:
    """The hull voltage at composition x (steps as in ``hull_report``); NaN outside them."""
    for s in steps:
        if s["x_start"] <= x < s["x_end"]:
            return float(s["voltage_V"])
    return float("nan")


def max_voltage_difference(steps_a: list[dict], steps_b: list[dict]) -> float:
    """Largest |V_a(x) - V_b(x)| over the x range both hull profiles cover.

    Both voltages are piecewise constant, so comparing them at the midpoint of every interval
    between consecutive breakpoints of either profile is exact.
    """
    breaks = sorted({s[k] for s in steps_a + steps_b for k in ("x_start", "x_end")})
    diffs = [abs(voltage_at(steps_a, m) - voltage_at(steps_b, m)) for m in
             ((lo + hi) / 2 for lo, hi in zip(breaks[:-1], breaks[1:]))]
    diffs = [d for d in diffs if np.isfinite(d)]
    return float(max(diffs)) if diffs else float("nan")
