"""Fixtures shared by the mlff tests."""

from __future__ import annotations

import pytest

from tub_mlff.structures import add_sodium, janus_graphene


@pytest.fixture(scope="module")
def cell():
    """A small periodic Na gallery cell of aminobenzene-functionalised Janus graphene, rattled."""
    a = add_sodium(janus_graphene(2, 1, stacking="gallery", interlayer=9.0), 1, "random", seed=1)
    a.rattle(0.05, seed=0)
    return a
