import os
from pathlib import Path

import pytest

REFERENCE_REPO = Path(os.environ.get("PATHOROB_REFERENCE", "/tmp/ref-pathorob"))


@pytest.fixture
def reference_repo():
    """A checkout of bifold-pathomics/PathoROB (46594e9); tests that need its shipped files skip without it."""
    if not (REFERENCE_REPO / "results").is_dir():
        pytest.skip("PathoROB reference checkout not available (set PATHOROB_REFERENCE)")
    return REFERENCE_REPO


@pytest.fixture(autouse=True)
def _one_thread():
    """Results do not depend on thread count; one thread avoids OpenMP/BLAS spinning on shared CI boxes."""
    from tub_pathorob.threads import limit_threads

    with limit_threads(1):
        yield
