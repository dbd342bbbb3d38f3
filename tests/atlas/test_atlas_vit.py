"""The ViT forward pass against the spec's formulas (§2.2) written out naively, and its presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tub_atlas.presets import PRESETS
from tub_atlas.synthetic import preset_config, random_vit
from tub_atlas.vit import ViTConfig, VisionTransformer, pool_tokens, resample_pos_embed


@pytest.mark.parametrize("name,millions", [("uni2-h", 681.4), ("virchow2", 631.2), ("h-optimus-0", 1134.8),
                                           ("h-optimus-1", 1134.8), ("vit-s8-reg8", 21.7)])
def test_preset_parameter_counts_match_published_sizes(name, millions):
    assert round(preset_config(name).num_params() / 1e6, 1) == millions


def test_num_params_counts_what_the_module_allocates():
    for name in ("virchow2", "uni2-h", "vit-t8-demo"):
        cfg = preset_config(name, depth=1)
        with torch.device("meta"):
            m = VisionTransformer(cfg)
        assert sum(p.numel() for p in m.parameters()) == cfg.num_params()


def naive_forward(sd: dict, cfg: ViTConfig, x: torch.Tensor) -> torch.Tensor:
    """Spec §2.2 step by step with explicit per-head loops, written independently of vit.py."""
    D, P, R, Hh = cfg.embed_dim, cfg.patch_size, cfg.reg_tokens, cfg.num_heads
    B, _, H, W = x.shape
    gh, gw = H // P, W // P
    # 1. patches: unfold, row-major, matmul with the conv kernel
    patches = x.reshape(B, 3, gh, P, gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, 3 * P * P)
    t = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    cls = sd["cls_token"].expand(B, 1, D)
    regs = [sd["reg_token"].expand(B, R, D)] if R else []
    pos = sd["pos_embed"]
    if cfg.pos_layout == "patches":
        assert pos.shape[1] == gh * gw
        tok = torch.cat([cls, *regs, t + pos], 1)
    else:
        tok = torch.cat([cls, *regs, t], 1) + pos
    hd = D // Hh

    def ln(z, w, b):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-6) * w + b

    for i in range(cfg.depth):
        p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = ln(tok, p("norm1.weight"), p("norm1.bias"))
        qkv = h @ p("attn.qkv.weight").T + p("attn.qkv.bias")
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        heads = []
        for j in range(Hh):
            sl = slice(j * hd, (j + 1) * hd)
            a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), -1)
            heads.append(a @ v[..., sl])
        a = torch.cat(heads, -1) @ p("attn.proj.weight").T + p("attn.proj.bias")
        tok = tok + p("ls1.gamma") * a
        h = ln(tok, p("norm2.weight"), p("norm2.bias"))
        u = h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")
        if cfg.mlp == "swiglu":
            half = u.shape[-1] // 2
            u = F.silu(u[..., :half]) * u[..., half:]  # gate first
        else:
            u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        tok = tok + p("ls2.gamma") * (u @ p("mlp.fc2.weight").T + p("mlp.fc2.bias"))
    return ln(tok, sd["norm.weight"], sd["norm.bias"])


@pytest.mark.parametrize("layout,mlp,regs", [("prefix", "swiglu", 4), ("patches", "swiglu", 8),
                                             ("patches", "gelu", 0), ("prefix", "gelu", 2)])
def test_forward_matches_naive_spec_implementation(layout, mlp, regs):
    cfg = ViTConfig(patch_size=8, embed_dim=48, depth=2, num_heads=4, reg_tokens=regs, pos_layout=layout,
                    pos_grid=4, mlp=mlp, mlp_hidden=64)
    m = random_vit(cfg, seed=3).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = m.forward_features(x)
        ref = naive_forward({k: v for k, v in m.state_dict().items()}, cfg, x)
    assert ours.shape == (2, 1 + regs + 16, 48)
    assert (ours - ref).abs().max() < 1e-12


def test_explicit_attention_and_lrp_forward_give_the_same_values():
    cfg = preset_config("vit-t8-demo")
    m = random_vit(cfg).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        fused = m(x)
        m.keep_attention = True
        explicit = m(x)
        assert len(m.attentions) == cfg.depth
        m.keep_attention, m.lrp = False, True
        lrp = m(x)
        m.lrp = False
    assert (fused - explicit).abs().max() < 1e-12
    assert (fused - lrp).abs().max() < 1e-12


def test_pos_embed_resampling_is_identity_at_native_grid_and_keeps_prefix():
    pos = torch.randn(1, 1 + 4 + 16, 8)
    assert resample_pos_embed(pos, (4, 4), 5) is pos
    big = resample_pos_embed(pos, (8, 6), 5)
    assert big.shape == (1, 5 + 48, 8)
    assert torch.equal(big[:, :5], pos[:, :5])
    # a constant table stays constant under (antialiased, normalised) bicubic resampling
    const = torch.ones(1, 16, 3)
    assert torch.allclose(resample_pos_embed(const, (7, 7), 0), torch.ones(1, 49, 3), atol=1e-6)


def test_other_image_sizes_run_with_interpolated_positions():
    m = random_vit(preset_config("virchow2", depth=1), seed=0)
    with torch.no_grad():
        out = m(torch.randn(1, 3, 14 * 20, 14 * 18))
    assert out.shape == (1, 1 + 4 + 360, 1280)
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(1, 3, 100, 100))


def test_cls_mean_pooling_is_pathorob_clsmean_and_excludes_registers():
    tokens = torch.randn(3, 1 + 8 + 16, 5)
    tokens[:, 1:9] = 1e6  # registers must not leak into the mean
    ref = torch.cat([tokens[:, 0], tokens[:, 9:].mean(1)], dim=-1)  # PathoROB uni.py: skip 1 + R tokens
    assert torch.equal(pool_tokens(tokens, 9, "cls+mean"), ref)
    assert torch.equal(pool_tokens(tokens, 9, "cls"), tokens[:, 0])
    assert pool_tokens(tokens, 9, "mean").abs().max() < 1e3
    assert pool_tokens(tokens, 9, "tokens").shape == (3, 16, 5)


def test_every_preset_names_its_normalisation():
    for p in PRESETS.values():
        mean, std = p.mean_std
        assert len(mean) == len(std) == 3


def test_bf16_autocast_path_stays_close_to_fp32():
    """The reduced-precision path used on GPUs (autocast; weights stay fp32), exercised on CPU."""
    from tubcli.device import autocast

    m = random_vit(preset_config("vit-t8-demo"), seed=0)
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        ref = m(x)
        with autocast(torch.device("cpu"), torch.bfloat16):
            low = m(x)
    rel = (low.float() - ref).norm() / ref.norm()
    assert 0 < rel < 0.02  # really computed in bf16 (not identical), and close


def test_pos_embed_resampling_equals_pil_bicubic_without_timm():
    from PIL import Image
    from tub_atlas.vit import resample_pos_embed
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 16, 3, generator=g)
    for grid in [(7, 7), (3, 3), (6, 5)]:
        out = resample_pos_embed(pos, grid, 1)[0, 1:].reshape(*grid, 3).numpy()
        table = pos[0, 1:].reshape(4, 4, 3).numpy()
        for c in range(3):
            im = Image.fromarray(table[..., c].astype(np.float32), mode="F").resize((grid[1], grid[0]), Image.BICUBIC)
            assert np.abs(out[..., c] - np.asarray(im)).max() < 1e-5
