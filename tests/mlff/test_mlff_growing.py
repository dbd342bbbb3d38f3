"""Growing a trained SpookyNet (tub_mlff.growing) must not change a single prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tub_mlff.calculator import SpookyNetCalculator
from tub_mlff.growing import deepen, widen
from tub_mlff.properties import compute
from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
from tub_mlff.structures import spin_for


@pytest.fixture(scope="module")
def trained_like():
    """A small model whose every weight is non-zero, as after training (fresh models have many
    zero-initialised layers, which would hide a growth that leaks into old units)."""
    cfg = SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=2, use_d4_dispersion=False)
    model = SpookyNet(cfg, seed=0).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _predict(model, atoms):
    b = atoms.copy()
    b.calc = SpookyNetCalculator(model, charge=1.0, spin=spin_for(atoms, 1) + 2, dtype=torch.float64)
    return b.get_potential_energy(), b.get_forces(), b.get_stress(), b.get_charges()


@pytest.mark.parametrize("grow", [lambda m: deepen(m, 3), lambda m: widen(m, 12), lambda m: widen(m, 16)],
                         ids=["deepen-3", "widen-12", "widen-16"])
def test_growth_preserves_energy_forces_stress_and_charges(trained_like, cell, grow):
    big = grow(trained_like)
    assert big.num_parameters() > trained_like.num_parameters()
    ref, new = _predict(trained_like, cell), _predict(big, cell)
    assert abs(ref[0] - new[0]) < 1e-9
    for a, b in zip(ref[1:], new[1:]):
        np.testing.assert_allclose(b, a, atol=1e-10)
    assert np.abs(ref[1]).max() > 0.1  # the comparison is not between zeros


def test_widened_model_learns_through_its_new_features(trained_like, cell):
    wide = widen(trained_like, 16).train()
    batch = SpookyNetCalculator(wide, spin=spin_for(cell), dtype=torch.float64).batch_for(cell)
    out = compute(wide, batch, forces=True, create_graph=True)
    (out["energy"].sum() + (out["forces"] ** 2).sum()).backward()
    # old units read the new features through weights that start at zero but get a gradient
    for lin in (wide.interactions[0].pre.blocks[0].lin1, wide.interactions[1].local.mlp_out.lin, wide.readout):
        assert lin.weight[:8, 8:].abs().max() == 0
        assert lin.weight.grad[:8, 8:].abs().max() > 1e-8


def test_growth_refuses_to_shrink(trained_like):
    with pytest.raises(ValueError, match="already has 8 features"):
        widen(trained_like, 4)
    with pytest.raises(ValueError, match="already has 2 modules"):
        deepen(trained_like, 1)
