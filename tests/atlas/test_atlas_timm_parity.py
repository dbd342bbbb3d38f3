"""Numerical parity with timm on identical weights (spec §6 target 1).

timm is not a dependency (it imports torchvision, which cannot sit beside the project's CPU torch),
so this file skips when timm is absent. Procedure used to run it (recorded in the plugin README):

    python -m venv /tmp/timmenv
    /tmp/timmenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors numpy \
        pytest pydantic pluggy typer rich pyyaml
    PYTHONPATH=.:plugins/tub-atlas /tmp/timmenv/bin/python -m pytest tests/atlas/test_atlas_timm_parity.py \
        -q -p no:cacheprovider --import-mode=importlib -s

Recorded on the 2-core CPU dev box (AMD EPYC; torch 2.14.1, timm 1.0.31), max |Δ| of forward_features,
fp32, inference path. gemm="aten" (timm's BLAS kernels): 0.0 for uni2-h, virchow2, h-optimus-0 (depth 2)
and vit-s8-reg8 (depth 12), at 224 and 448 px. gemm="auto" (oneDNN GEMMs, the default on CPU):
224 px uni2-h 6.5e-6, virchow2 4.9e-6, h-optimus-0 7.4e-6, vit-s8-reg8 4.8e-6; 448 px 6.7e-6 / 5.2e-6 /
7.2e-6 / 4.5e-6. DINOv2 checkpoints with 518-px positions through timm's checkpoint_filter_fn vs tub's
convert: h-optimus-0 8.3e-6, vit-s8-reg8 3.0e-6 (depth 2). CLS embedding (tub forward_cls vs timm
model(x)): uni2-h 4.8e-6, virchow2 4.1e-6, vit-s8-reg8 4.2e-6.

timm versions: the RoPE cases need timm's Eva DINOv3 port; RudolfV-2's q/k LayerNorm can be passed
to Eva only from timm 1.0.30 on, so that case skips on older timm. Checked on this box: timm 1.0.29
(DINOv3-S/16 case), 1.0.30 and 1.0.31 give the same RoPE figures (periods equal, max |Δ| 1.6e-6 at
224 px); the RoPE maths of timm's DINOv3 embedding is the same in the three versions.
"""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from tub_atlas.synthetic import preset_config, random_vit  # noqa: E402


def timm_model(name: str, depth: int, dynamic: bool):
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    common = dict(num_classes=0, dynamic_img_size=dynamic, init_values=1e-5, global_pool="token")
    if name == "uni2-h":
        return TimmViT(img_size=224, patch_size=14, depth=depth, num_heads=24, embed_dim=1536,
                       mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
                       reg_tokens=8, no_embed_class=True, **common)
    if name == "virchow2":
        return TimmViT(img_size=224, patch_size=14, depth=depth, num_heads=16, embed_dim=1280,
                       mlp_ratio=5.3375, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
                       reg_tokens=4, **common)
    if name == "h-optimus-0":  # vit_giant_patch14_reg4_dinov2 with img_size=224
        return TimmViT(img_size=224, patch_size=14, depth=depth, num_heads=24, embed_dim=1536,
                       mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
                       reg_tokens=4, no_embed_class=True, **common)
    if name == "vit-s8-reg8":
        return TimmViT(img_size=224, patch_size=8, depth=depth, num_heads=6, embed_dim=384, mlp_ratio=4,
                       reg_tokens=8, no_embed_class=True, **common)
    raise KeyError(name)


CASES = [("uni2-h", 2), ("virchow2", 2), ("h-optimus-0", 2), ("vit-s8-reg8", 12)]


@pytest.mark.parametrize("name,depth", CASES)
@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("gemm", ["auto", "aten"])
def test_forward_features_match_timm(name, depth, size, gemm):
    """gemm="auto" (oneDNN GEMMs on CPU) agrees to fp32 rounding; gemm="aten" runs timm's kernels."""
    torch.manual_seed(0)
    ours = random_vit(preset_config(name, depth=depth), seed=1)
    ours.gemm = gemm
    theirs = timm_model(name, depth, dynamic=size != 224).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # identical weights, timm key layout
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    x = (x - 0.5) / 0.25
    with torch.inference_mode():
        a = ours.forward_features(x)
        b = theirs.forward_features(x)
    assert a.shape == b.shape
    delta = (a - b).abs().max().item()
    print(f"PARITY {name} depth={depth} {size}px gemm={gemm} max|d|={delta:.3e}")
    assert delta <= 1e-5


@pytest.mark.parametrize("name", ["h-optimus-0", "vit-s8-reg8"])
def test_dinov2_checkpoint_with_518px_positions_matches_timm_filter(name):
    """A DINOv2 checkpoint (registers, 518-px position table) through timm's checkpoint_filter_fn
    (its _convert_dinov2 + load-time position resampling) vs tub's convert + run-time resampling."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from tub_atlas.checkpoint import infer_config, to_timm_layout
    from tub_atlas.synthetic import to_dinov2
    from tub_atlas.vit import VisionTransformer

    P = 14 if name == "h-optimus-0" else 8
    g = 518 // 14 if P == 14 else 448 // 8  # stored grid larger than the 224-px model grid
    cfg = preset_config(name, depth=2, pos_grid=g)
    src = random_vit(cfg, seed=4)
    # un-chunk (chunks=1 writes blocks.0.{i}.…): timm's filter expects plain blocks.{i}
    dino = {k.replace("blocks.0.", "blocks.", 1) if k.startswith("blocks.0.") else k: v
            for k, v in to_dinov2(src.state_dict(), prefix="", chunks=1).items()}
    theirs = timm_model(name, 2, dynamic=False).eval()
    theirs.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in dino.items()}, theirs), strict=True)
    sd = to_timm_layout(dino)
    ours = VisionTransformer(infer_config(sd, cfg.num_heads)).eval()
    ours.load_state_dict(sd)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        delta = (ours.forward_features(x) - theirs.forward_features(x)).abs().max().item()
    print(f"PARITY dinov2 {name} stored grid {g} -> 224px max|d|={delta:.3e}")
    assert delta <= 1e-5


@pytest.mark.parametrize("name,depth", [("uni2-h", 2), ("virchow2", 2), ("vit-s8-reg8", 12)])
def test_cls_embedding_matches_timm_pooled_output(name, depth):
    """tub forward_cls (last block at the CLS position only) vs timm model(x), global_pool="token"."""
    ours = random_vit(preset_config(name, depth=depth), seed=1)
    theirs = timm_model(name, depth, dynamic=False).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        delta = (ours.forward_cls(x) - theirs(x)).abs().max().item()
    print(f"PARITY cls {name} depth={depth} max|d|={delta:.3e}")
    assert delta <= 1e-5


# ------------------------------------------------------------------ 2-D RoPE (DINOv3 layout)
@pytest.mark.parametrize("kind", ["dinov3-s16", "rudolfv-2-s"])
@pytest.mark.parametrize("size", [224, 320])
def test_rope_vit_matches_timm_eva(tmp_path, kind, size):
    """A DINOv3-layout checkpoint through tub's convert vs the same weights in timm's Eva DINOv3 port
    (``benchmark.timm_twin``: rope_type="dinov3", temperature 100, rotate-half; the DINOv3 ViT-S/16
    recipe with SwiGLU so the w1/w2/w3 path is covered, and RudolfV-2-S shapes with q/k LayerNorm)."""
    from tub_atlas.benchmark import timm_state_dict, timm_twin
    from tub_atlas.checkpoint import read_checkpoint
    from tub_atlas.presets import PRESETS
    from tub_atlas.synthetic import to_dinov3, zero_k_bias
    from tub_atlas.vit import ViTConfig, VisionTransformer

    if kind == "rudolfv-2-s":
        cfg = preset_config("rudolfv-2-s", depth=2)
    else:
        cfg = ViTConfig(patch_size=16, embed_dim=384, depth=2, num_heads=6, reg_tokens=4, pos_layout="rope",
                        pos_grid=14, mlp="swiglu", mlp_hidden=1536, norm_eps=1e-5)
    src = zero_k_bias(random_vit(cfg, seed=6))
    try:
        theirs = timm_twin(cfg).eval()
    except RuntimeError as err:  # timm < 1.0.30: Eva(qk_norm=...) missing (the RoPE maths is the same)
        pytest.skip(str(err))
    theirs.load_state_dict(timm_state_dict(cfg, src.state_dict()), strict=True)
    ckpt = to_dinov3(src.state_dict())
    if kind == "rudolfv-2-s":  # the HF wrapper's names: model. prefix, DINOv2's register_tokens
        ckpt = {"model." + k.replace("storage_tokens", "register_tokens"): v for k, v in ckpt.items()}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    got, sd, _ = read_checkpoint(tmp_path / "ckpt.pth", preset=PRESETS.get(kind))
    ours = VisionTransformer(got).eval()
    ours.load_state_dict(sd)
    assert torch.allclose(ours.rope_embed.periods, theirs.rope.periods)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        a, b = ours.forward_features(x), theirs.forward_features(x)
        c, pooled = ours.forward_cls(x), theirs(x)
    delta, delta_cls = (a - b).abs().max().item(), (c - pooled).abs().max().item()
    print(f"PARITY rope {kind} {size}px max|d|={delta:.3e} cls {delta_cls:.3e}")
    assert a.shape == b.shape and delta <= 1e-5 and delta_cls <= 1e-5
