"""Shared by every test: one torch thread.

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
