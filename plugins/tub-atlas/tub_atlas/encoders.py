"""Loaders behind the ``tub_patch_encoders`` hook: ``load_<preset>(weights, device, dtype)``.

Each returns an ``Encoder`` mapping RGB tiles in [0, 1] (B, 3, tile, tile) to (B, dim) with the
preset's own normalisation and pooling. ``weights=None`` is an error except for ``vit-t8-demo``,
which is documented as a randomly initialised demo/test encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tubcli.device import as_torch_dtype
from tubcli.errors import TubError

from .encoder import Encoder, load_encoder
from .plugin import ENCODERS, FROM_WEIGHTS, loader_name

RANDOM_OK = {"vit-t8-demo"}


def load_patch_encoder(name: str, weights: str | Path | None, device="cpu", dtype=None) -> Encoder:
    dtype = as_torch_dtype(dtype)  # the CLI's spellings ("bf16") and torch's names ("bfloat16") too
    if weights is None and name not in RANDOM_OK:
        raise TubError(f"encoder {name} needs a local weights file (tub never downloads weights); "
                       "pass its path")
    enc, _ = load_encoder("auto" if name == FROM_WEIGHTS else name, weights, random_init=weights is None,
                          device=device, dtype=dtype if dtype not in (None, torch.float32) else None)
    return enc.requires_grad_(False)


def _make(name: str):
    def loader(weights=None, device="cpu", dtype=None):
        return load_patch_encoder(name, weights, device, dtype)

    loader.__name__ = loader_name(name)
    loader.__doc__ = f"Patch encoder {name} (see tub_atlas.encoders)."
    return loader


# one loader per advertised encoder, from the hook's own table (never a hand-kept list that can fall behind)
globals().update({loader_name(name): _make(name) for name in ENCODERS})
