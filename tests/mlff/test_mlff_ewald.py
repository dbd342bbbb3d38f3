"""Ewald summation of SpookyNet's Coulomb term (tub_mlff.physical_terms.Electrostatics.set_ewald).

Rock salt with r0 = 4.2 A: every pair lies beyond the shielding switch (0.75 r_c = 3.97 A), so the
term is the bare Coulomb sum and its lattice energy is analytic (Madelung constant).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tub_mlff.neighbors import neighbor_list
from tub_mlff.physical_terms import KE, Electrostatics
from tub_mlff.spookynet import DEFAULT_CUTOFF

MADELUNG_NACL = 1.747564594633182
R0 = 4.2


def _ewald_energy(pos, cell, q, kmax=15, alpha=None, radius=9.0):
    el = Electrostatics(DEFAULT_CUTOFF).double()
    el.set_ewald(kmax, alpha)
    i, j, _, d = neighbor_list(pos, cell, True, radius)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    q = t(q)
    real = 0.5 * el.pair_energy(q, t(d), torch.as_tensor(i), torch.as_tensor(j)).sum()
    seg = torch.zeros(len(pos), dtype=torch.long)
    rec = el.reciprocal_energy(q, t(pos), t(cell)[None], seg, 1).sum()
    return float(real + rec)


def _conventional():
    a = 2 * R0
    fcc = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]]) * a
    pos = np.vstack([fcc, fcc + [a / 2, 0, 0]])
    return pos, np.eye(3) * a, np.array([1.0] * 4 + [-1.0] * 4)


def _primitive():
    a = 2 * R0
    cell = np.array([[0, .5, .5], [.5, 0, .5], [.5, .5, 0]]) * a
    return np.array([[0, 0, 0], [a / 2, a / 2, a / 2]]), cell, np.array([1.0, -1.0])


def test_rock_salt_lattice_energy_is_the_madelung_energy():
    want = -KE * MADELUNG_NACL / R0  # per ion pair
    assert _ewald_energy(*_conventional()) / 4 == pytest.approx(want, abs=1e-7)


def test_triclinic_primitive_cell_gives_the_same_crystal_energy():
    # the reference sums k over the cell diagonal only, which is wrong for this cell
    want = -KE * MADELUNG_NACL / R0
    assert _ewald_energy(*_primitive(), kmax=20) == pytest.approx(want, abs=1e-7)


def test_charged_cell_energy_does_not_depend_on_alpha():
    pos, cell, q = _conventional()
    q = q.copy()
    q[4:] = -0.5  # net charge +2: needs the neutralising background
    e = [_ewald_energy(pos, cell, q, kmax=18, alpha=alpha) for alpha in (0.8, 1.0, 1.3)]
    assert np.ptp(e) < 1e-6, e
    assert abs(e[0]) > 1.0


def test_ewald_switch_and_bad_kmax():
    el = Electrostatics(DEFAULT_CUTOFF)
    el.set_ewald(3)
    assert el.alpha == pytest.approx(4 / (0.75 * DEFAULT_CUTOFF) + 1e-3)
    assert len(el.kmul) == sum(1 for x in range(-3, 4) for y in range(-3, 4) for z in range(-3, 4)
                               if 0 < x * x + y * y + z * z <= 9)
    el.set_ewald(None)
    assert el.ewald_kmax is None
    with pytest.raises(ValueError, match="positive"):
        el.set_ewald(0)
    assert math.isfinite(el.alpha)


def test_model_with_ewald_has_conservative_forces_on_a_triclinic_cell():
    from ase import Atoms

    from tub_mlff.calculator import SpookyNetCalculator
    from tub_mlff.spookynet import SpookyNet, SpookyNetConfig

    model = SpookyNet(SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=1,
                                      use_d4_dispersion=False), seed=0).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh model predicts zero charges: give every weight a value
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    atoms = Atoms("NaHCN", positions=[[0.2, 0.1, 0.3], [1.9, 0.4, 0.2], [0.8, 2.1, 1.6], [2.6, 2.2, 2.9]],
                  cell=[[5.0, 0.0, 0.0], [1.2, 4.6, 0.0], [0.4, 0.8, 5.3]], pbc=True)

    def calc(kmax):
        return SpookyNetCalculator(model, dtype=torch.float64, lr_cutoff=8.0, ewald_kmax=kmax)

    plain = atoms.copy()
    plain.calc = calc(None)
    e_plain = plain.get_potential_energy()
    atoms.calc = calc(8)  # the calculators share the model: this switches it to Ewald
    assert abs(atoms.get_potential_energy() - e_plain) > 1e-4  # the sum is active
    f = atoms.get_forces()
    for k, c in ((0, 0), (1, 2), (3, 1)):
        e = []
        for h in (1e-5, -1e-5):
            b = atoms.copy()
            b.positions[k, c] += h
            b.calc = calc(8)
            e.append(b.get_potential_energy())
        assert -(e[0] - e[1]) / 2e-5 == pytest.approx(f[k, c], abs=1e-6)
