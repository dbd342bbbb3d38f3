"""Encoder presets and preprocessing constants (spec §2.3, §2.4). Pure Python: no torch import.

A preset fixes what shapes cannot tell (head count, normalisation, input size, default pooling)
and the shapes it expects; ``None`` means "take it from the checkpoint". The Atlas 2 presets are
placeholders: the paper (Alber et al., arXiv 2601.05148) publishes neither weights nor the exact
architecture, so their shapes always come from ``inspect``.
"""

from __future__ import annotations

from dataclasses import dataclass

NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "h-optimus": ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
    "rudolfv-2": ((0.7072, 0.5787, 0.7036), (0.2119, 0.2301, 0.1775)),
}

# D -> heads when neither a preset nor model.json says (spec §2.1); ViT-H has head_dim 80.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}


@dataclass(frozen=True)
class Preset:
    name: str
    patch_size: int | None
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    reg_tokens: int | None
    pos_layout: str | None  # "patches" | "prefix" | None (infer)
    mlp: str | None
    mlp_hidden: int | None
    layer_scale: bool | None
    norm: str
    pool: str
    img_size: int = 224
    interpolation: str = "bilinear"
    crop: bool = False
    licence: str = ""
    description: str = ""
    verified: bool = True
    qk_norm: bool = False

    @property
    def mean_std(self):
        return NORMALISATIONS[self.norm]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("uni2-h", 14, 1536, 24, 24, 8, "patches", "swiglu", 4096, True, "imagenet", "cls",
               licence="CC-BY-NC-ND-4.0", description="UNI2-h (Mahmood lab), ViT-g/14, 8 registers; 681.4M params"),
        Preset("virchow2", 14, 1280, 32, 16, 4, "prefix", "swiglu", 3416, True, "imagenet", "cls+mean",
               licence="CC-BY-NC-ND-4.0", description="Virchow2 (Paige), ViT-H/14, 4 registers with positions; 631.2M"),
        Preset("h-optimus-0", 14, 1536, 40, 24, 4, "patches", "swiglu", 4096, True, "h-optimus", "cls",
               licence="Apache-2.0", description="H-optimus-0 (Bioptimus), ViT-g/14, 4 registers; 1134.8M"),
        Preset("h-optimus-1", 14, 1536, 40, 24, 4, "patches", "swiglu", 4096, True, "h-optimus", "cls",
               licence="check the model card", description="H-optimus-1 (Bioptimus), same shapes as -0"),
        Preset("rudolfv-2", 8, 1536, 40, 24, 8, "rope", "swiglu", 4096, True, "rudolfv-2", "cls+mean",
               interpolation="bicubic", crop=True, licence="gated; check the model card", qk_norm=True,
               description="RudolfV-2 ViT-g/8, 8 registers, 2-D RoPE (DINOv3 layout assumed), "
                           "q/k LayerNorm; 1133.8M", verified=False),
        Preset("rudolfv-2-b", 8, 768, 12, 12, 8, "rope", "swiglu", 2048, True, "rudolfv-2", "cls+mean",
               interpolation="bicubic", crop=True, licence="gated; check the model card", qk_norm=True,
               description="RudolfV-2-B ViT-B/8, 8 registers, 2-D RoPE (DINOv3 layout assumed), "
                           "q/k LayerNorm; 85.2M", verified=False),
        Preset("rudolfv-2-s", 8, 384, 12, 6, 8, "rope", "swiglu", 1024, True, "rudolfv-2", "cls+mean",
               interpolation="bicubic", crop=True, licence="gated; check the model card", qk_norm=True,
               description="RudolfV-2-S ViT-S/8, distilled, 8 registers, 2-D RoPE (DINOv3 layout "
                           "assumed), q/k LayerNorm; 21.4M", verified=False),
        Preset("atlas2", None, None, None, None, None, None, None, None, None, "h-optimus", "cls+mean",
               licence="not public", description="Atlas 2 placeholder: shapes from inspect (unverified)",
               verified=False),
        Preset("atlas2-b", None, None, None, None, None, None, None, None, None, "h-optimus", "cls+mean",
               licence="not public", description="Atlas 2-B placeholder: shapes from inspect (unverified)",
               verified=False),
        Preset("atlas2-s", None, None, None, None, None, None, None, None, None, "h-optimus", "cls+mean",
               licence="not public", description="Atlas 2-S placeholder: shapes from inspect (unverified)",
               verified=False),
        Preset("vit-s8-reg8", 8, 384, 12, 6, 8, "patches", "gelu", 1536, True, "h-optimus", "cls+mean",
               licence="project", description="ViT-S/8 with 8 registers: default distillation student"),
        Preset("vit-t8-demo", 8, 192, 2, 3, 4, "patches", "gelu", 768, True, "imagenet", "cls+mean",
               img_size=64, licence="project",
               description="tiny ViT/8 for demos and tests (random init unless trained weights are given)"),
    ]
}


def get_preset(name: str) -> Preset:
    from tubcli.errors import TubError

    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise TubError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (or 'auto')")
    return PRESETS[key]
