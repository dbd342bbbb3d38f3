"""Embedding tiles with a patch encoder offered through the ``tub_patch_encoders`` hook."""

from __future__ import annotations

import numpy as np
import torch

from tubcli.device import autocast
from tubcli.errors import TubError


def get_encoder(name: str, weights=None, device="cpu", dtype=None):
    """(spec, module) for a hook-offered encoder; a missing provider is a clear error."""
    from tubcli.plugins import patch_encoders

    offered = patch_encoders()
    if name not in offered:
        if not offered:
            raise TubError(f"no patch encoders are installed (encoder {name!r} requested); install "
                           "the plugin that offers them: pip install 'tub-xmil[encoders]' (in a clone: pip install -e "
                           "plugins/tub-atlas)")
        raise TubError(f"unknown patch encoder {name!r}; installed: {', '.join(sorted(offered))}")
    spec = offered[name]
    module = spec.load(weights, device, dtype)
    return spec.resolved(module), module


def embed_tiles(slide, coords: np.ndarray, size_level0: int, spec, module, batch_size: int = 64,
                device="cpu", dtype=None) -> np.ndarray:
    """(n, dim) float32 embeddings of the tiles at ``coords`` (level 0), resized to the encoder's
    tile size, computed in ``dtype`` (the run's --precision)."""
    from tub_xmil.slides import read_tile
    from tubcli.prefetch import read_ahead

    def read(s):
        return np.stack([read_tile(slide, x, y, size_level0, spec.tile_size) for x, y in coords[s:s + batch_size]])

    out = []
    with torch.no_grad(), autocast(device, dtype):
        for s, tiles in read_ahead(read, range(0, len(coords), batch_size)):  # the next batch read meanwhile
            # uint8 to the device (a quarter of float32's bytes), converted there: exact on any device
            x = torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2).float().div(255)
            emb = module(x).float()
            finite = torch.isfinite(emb).all(dim=1).cpu()
            if not bool(finite.all()):  # a bag of NaN would only show up as a "diverged" training later
                raise TubError(_non_finite_message(coords[s:s + batch_size], finite, dtype))
            out.append(emb.cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _non_finite_message(coords: np.ndarray, finite: torch.Tensor, dtype) -> str:
    bad = torch.nonzero(~finite).flatten().tolist()
    x, y = (int(v) for v in coords[bad[0]])
    more = f" (and {len(bad) - 1} more of its batch)" if len(bad) > 1 else ""
    why = "fp16 overflows in this encoder: use --precision bf16 or fp32" if dtype == torch.float16 else \
        "check the encoder's weights (or try --precision fp32)"
    return f"the embedding of the tile at level-0 ({x}, {y}){more} is NaN or inf, nothing was written; {why}"
