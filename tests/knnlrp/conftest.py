"""Shared fixtures: the standard splits of the bundled binary tasks (spec §5)."""

import pytest

from tub_knnlrp.data import bundled, standard_split


@pytest.fixture(scope="module")
def cancer():
    t = bundled("breast_cancer")
    return standard_split(t.X, t.y)


@pytest.fixture(scope="module")
def digits49():
    t = bundled("digits49")
    return standard_split(t.X, t.y)
