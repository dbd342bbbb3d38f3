"""Attention rollout and conservative LRP (spec §2.9; §6 target 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tub_atlas.encoder import Encoder, Transform
from tub_atlas.lrp import lrp, make_target, patch_map
from tub_atlas.rollout import attention_rollout, keep_attention, rollout_matrix
from tub_atlas.synthetic import preset_config, random_vit
from tub_atlas.vit import ViTConfig


def _encoder(cfg: ViTConfig, pool="cls+mean", seed=0) -> Encoder:
    return Encoder(random_vit(cfg, seed=seed).double(), Transform(img_size=cfg.img_size), pool)


def test_rollout_rows_sum_to_one():
    m = random_vit(preset_config("vit-t8-demo")).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with keep_attention(m), torch.no_grad():
        m(x)
        R = rollout_matrix(m.attentions)
    assert R.shape == (2, 69, 69)
    assert torch.allclose(R.sum(-1), torch.ones(2, 69, dtype=torch.float64), atol=1e-12)
    assert m.keep_attention is False and m.attentions == []  # model left as found


def test_rollout_of_uniform_attention_is_analytic():
    cfg = preset_config("vit-t8-demo", depth=3)
    m = random_vit(cfg).double()
    with torch.no_grad():
        for blk in m.blocks:  # q = k = 0 -> every attention row is uniform 1/T
            blk.attn.qkv.weight[: 2 * cfg.embed_dim] = 0
            blk.attn.qkv.bias[: 2 * cfg.embed_dim] = 0
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with keep_attention(m), torch.no_grad():
        m(x)
        R = rollout_matrix(m.attentions)[0]
    T, L = R.shape[0], cfg.depth
    expected = 2.0**-L * torch.eye(T, dtype=torch.float64) + (1 - 2.0**-L) * torch.full((T, T), 1 / T,
                                                                                       dtype=torch.float64)
    assert (R - expected).abs().max() / expected.abs().max() < 1e-6
    heat = attention_rollout(m, x)
    assert heat.shape == (1, 8, 8)
    assert torch.allclose(heat, torch.full_like(heat, (1 - 2.0**-L) / T), rtol=1e-6)


CONFIGS = {
    "swiglu-prefix-regs": ViTConfig(patch_size=8, embed_dim=48, depth=2, num_heads=4, reg_tokens=4,
                                    pos_layout="prefix", pos_grid=4, mlp="swiglu", mlp_hidden=64),
    "gelu-patches-regs": ViTConfig(patch_size=8, embed_dim=48, depth=2, num_heads=4, reg_tokens=2,
                                   pos_layout="patches", pos_grid=4, mlp="gelu", mlp_hidden=96),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["dim", "probe", "similarity"])
def test_lrp_conserves_the_explained_output(name, kind):
    cfg = CONFIGS[name]
    enc = _encoder(cfg)
    enc.transform.img_size = 40  # grid 5x5 against the stored 4x4: positions are resampled
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, enc.dim, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    ref = torch.randn(enc.dim, generator=g, dtype=torch.float64)
    target = make_target(kind, 2 if kind != "similarity" else 0, probe=(W, b), reference=ref)
    x01 = torch.rand(1, 3, 48, 48, generator=g, dtype=torch.float64)
    R, f, bias = lrp(enc, x01, target, return_terms=True)
    assert R.shape == (1, 40, 40)
    assert abs(float(R.sum()) + bias - f) <= 1e-6 * abs(f)
    assert abs(float(R.sum())) > 1e-3 * abs(f)  # pixels carry a real share, not just the biases
    assert enc.vit.lrp is False  # rules switched off again


def test_plain_gradient_times_input_does_not_conserve():
    """The check above can fail: without the conservative rules, Gradient × Input leaks relevance."""
    enc = _encoder(CONFIGS["swiglu-prefix-regs"])
    xn = enc.transform(torch.rand(1, 3, 32, 32, dtype=torch.float64)).requires_grad_(True)
    params = [p for n, p in enc.vit.named_parameters() if n.endswith(".bias") or "token" in n or "pos" in n]
    z = enc.vit.forward_features(xn)
    f = torch.cat([z[:, 0], z[:, 5:].mean(1)], -1)[0, 0]
    grads = torch.autograd.grad(f, [xn] + params)
    f = float(f.detach())
    total = float((xn.detach() * grads[0]).sum())
    total += sum(float((p.detach() * g).sum()) for p, g in zip(params, grads[1:]))
    assert abs(total - f) > 1e-3 * abs(f)


def test_patch_map_sums_pixels_per_patch():
    R = torch.arange(2 * 16 * 16, dtype=torch.float64).reshape(2, 16, 16)
    pm = patch_map(R, 8)
    assert pm.shape == (2, 2, 2)
    assert torch.allclose(pm[1, 0, 1], R[1, :8, 8:].sum())
    assert torch.allclose(pm.sum((1, 2)), R.sum((1, 2)))


def test_overlay_of_a_centre_cropping_model_covers_the_crop_only():
    """A 224 x 320 tile seen by a centre-cropping preset: the map covers columns 48..271, not the whole width."""
    from tub_atlas.encoder import Transform
    from tub_atlas.overlay import overlay

    t = Transform(img_size=224, crop=True)
    assert t.seen_box(224, 320) == (0.0, 48.0, 224.0, 224.0)
    assert Transform(img_size=112, crop=True).seen_box(224, 320) == (0.0, 48.0, 224.0, 224.0)
    assert Transform(img_size=224).seen_box(224, 320) == (0.0, 0.0, 224.0, 320.0)  # no crop: all of it
    tile = np.full((224, 320, 3), 200, np.uint8)
    heat = np.zeros((28, 28))
    heat[:, 0] = 1.0  # the left-most patch column of the crop
    panels = overlay(tile, heat, signed=False, alpha=0.5, box=t.seen_box(224, 320))
    blend, alone = panels[:, 320:640], panels[:, 640:]
    assert panels.shape == (224, 960, 3) and (panels[:, :320] == tile).all()
    assert (alone[:, :48] == 255).all() and (alone[:, 48:56] != 255).any()  # the map alone, where it lies
    assert (blend[:, :48] == 200).all() and (blend[:, 272:] == 200).all()  # outside the crop: the tile
    hot = blend[100, 48:56].astype(int)
    assert (np.abs(hot - blend[100, 200]).sum(-1) > 30).all()  # the hot column sits at tile x 48..55


def test_an_unreadable_probe_is_the_error_without_warnings_about_its_records(tmp_path, caplog):
    """Warnings that the probe has no probe.json and records no encoder came first and misled."""
    import logging
    from types import SimpleNamespace

    from tubcli.errors import TubError
    from tub_atlas.explaining import build_target

    probe = tmp_path / "text.safetensors"
    probe.write_text("not a safetensors file")
    cfg = SimpleNamespace(target="probe", probe=probe, index=0)
    encoder = SimpleNamespace(dim=8, pool="cls")
    with caplog.at_level(logging.WARNING, logger="tub.atlas"), pytest.raises(TubError, match="text.safetensors"):
        build_target(encoder, cfg, "cpu", info=None, log=logging.getLogger("tub.atlas"))
    assert not caplog.records
