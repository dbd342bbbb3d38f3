"""The hook contract between the core and plugins (pluggy, prefix ``tub_``; DESIGN §3)."""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

hookspec = pluggy.HookspecMarker("tub")
hookimpl = pluggy.HookimplMarker("tub")


@dataclass(frozen=True)
class EncoderSpec:
    """An image patch encoder that one plugin offers and others use by name.

    ``loader`` is a lazy ``"module:function"`` reference, called as
    ``loader(weights: Path | None, device, dtype) -> torch.nn.Module``. The module maps a float
    tensor ``(B, 3, tile_size, tile_size)`` with RGB in [0, 1] to ``(B, dim)`` embeddings and does
    its own normalisation. ``dim``/``tile_size`` None: known only from the weights (an encoder whose
    settings come with its checkpoint); the loaded module then has ``.dim`` and ``.tile_size``, and
    :meth:`resolved` gives the spec with them.
    """

    name: str
    loader: str
    dim: int | None
    tile_size: int | None = 224
    mpp: float = 0.5
    description: str = ""

    def load(self, weights=None, device="cpu", dtype=None):
        from tubcli.verbs import resolve_ref

        return resolve_ref(self.loader)(weights, device, dtype)

    def resolved(self, module) -> "EncoderSpec":
        """This spec with ``dim``/``tile_size`` taken from a loaded module where the spec leaves them open."""
        import dataclasses

        return dataclasses.replace(self, dim=self.dim if self.dim is not None else int(module.dim),
                                   tile_size=self.tile_size if self.tile_size is not None else int(module.tile_size))


@hookspec
def tub_register(registry) -> None:
    """Add the plugin's PluginApp (and anything else it offers) to the registry."""


@hookspec
def tub_patch_encoders() -> dict:
    """Image patch encoders other plugins can use by name: ``{name: EncoderSpec}``."""
