"""Shared fixtures for the xmil tests: a tiny test patch encoder registered through the hook."""

import sys
import types

import pytest
import torch

from tubcli import hookimpl
from tubcli.hookspecs import EncoderSpec

ENC_MODULE = "xmil_tests_tiny_encoder"


class _ColourEncoder(torch.nn.Module):
    """Per-channel mean and std of the tile, then a fixed random projection: 8-d."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(6, 2, generator=g), requires_grad=False)

    def forward(self, x):
        x = x.to(self.proj.dtype)  # as tub-atlas encoders: the input in the weights' dtype
        stats = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
        return torch.cat([stats, stats @ self.proj], 1)


def _load(weights=None, device="cpu", dtype=None):
    """Weights in the run's dtype, as the tub-atlas loaders do."""
    return _ColourEncoder().to(device=device, dtype=dtype)


class _EncoderPlugin:
    @hookimpl
    def tub_patch_encoders(self):
        return {"tiny-test": EncoderSpec(name="tiny-test", loader=f"{ENC_MODULE}:load", dim=8, tile_size=16)}


@pytest.fixture
def tiny_encoder():
    """Register the test encoder on the process-wide plugin manager; remove it afterwards."""
    from tubcli.plugins import get_plugins

    mod = types.ModuleType(ENC_MODULE)
    mod.load = _load
    sys.modules[ENC_MODULE] = mod
    plugins = get_plugins()
    obj = _EncoderPlugin()
    plugins.pm.register(obj, name="xmil-test-encoder")
    yield "tiny-test"
    plugins.pm.unregister(obj)
    sys.modules.pop(ENC_MODULE, None)
