"""Shared by every test: one torch thread, and none of the caller's TUB_*/SLURM_ARRAY_*/torchrun variables.

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
