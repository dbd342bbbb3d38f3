"""Fixtures shared by the mlff tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tub_mlff.structures import add_sodium, janus_graphene


@pytest.fixture(scope="module")
def cell():
    """A small periodic Na gallery cell of aminobenzene-functionalised Janus graphene, rattled."""
    a = add_sodium(janus_graphene(2, 1, stacking="gallery", interlayer=9.0), 1, "random", seed=1)
    a.rattle(0.05, seed=0)
    return a


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(stem)`` saves a random tiny model (see :func:`save_tiny_model`)."""
    return save_tiny_model


def save_tiny_model(stem: Path) -> Path:
    """A random tiny SpookyNet (F=8, one module, no Coulomb/D4) for H, C, N, Na, its weights perturbed off
    their initial values so that every term acts; saved as ``stem.safetensors`` (+ .json)."""
    import torch

    from tub_mlff.checkpoints import save_model
    from tub_mlff.spookynet import SpookyNet, SpookyNetConfig

    torch.manual_seed(0)
    m = SpookyNet(SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=1, use_electrostatics=False,
                                  use_d4_dispersion=False), seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(m.eval(), stem, extra={"elements": [1, 6, 7, 11]})
    return stem.with_suffix(".safetensors")
