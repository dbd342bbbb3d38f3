"""Shared by every test: one torch thread, none of the caller's TUB_*/SLURM_ARRAY_*/torchrun variables,
no figure left open.

The tests use tiny models, for which a second thread only adds synchronisation overhead (on a busy
2-core machine it made some of them many times slower); results do not depend on the thread count.
"""

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_caller_variables(monkeypatch):
    """A suite run inside an array job or with TUB_DEVICE exported tests the defaults all the same."""
    from tubcli.testing import isolate_environment

    isolate_environment(monkeypatch)


@pytest.fixture(autouse=True)
def close_figures():
    """Figures a test draws itself (a plot function's return value) are closed after it: hundreds of tests
    in one process otherwise keep them all in memory (matplotlib warned of more than 20 open)."""
    yield
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")
