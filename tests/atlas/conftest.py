"""Fixtures shared by the atlas tests."""

from __future__ import annotations

import pytest
from tubcli.testing import invoke


@pytest.fixture(scope="session")
def atlas_demo_tiles(tmp_path_factory):
    """`tub atlas make-data` output (8 tiles per class, PNG folders + tiles.npz), made once per session."""
    root = tmp_path_factory.mktemp("atlas_demo")
    r = invoke(["atlas", "make-data", root / "d", "--n-per-class", "8", "--checkpoint", "vit-t8-demo",
                "-o", root / "run"])
    assert r.exit_code == 0, r.stderr
    return root / "d"
