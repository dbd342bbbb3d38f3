"""The inference path (tub_atlas.inference) against the reference blocks: bit-identical outputs,
buffers that never leak into results, the CLS-only last block, and when the path must not be used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tub_atlas.encoder import Encoder, Transform
from tub_atlas.inference import onednn_available, usable
from tub_atlas.synthetic import preset_config, random_vit
from tub_atlas.vit import ViTConfig, pool_tokens


def reference(m, x):
    m.fast_inference = False
    try:
        with torch.no_grad():
            return m.forward_features(x)
    finally:
        m.fast_inference = True


CONFIGS = [
    ViTConfig(patch_size=8, embed_dim=48, depth=2, num_heads=4, reg_tokens=4, pos_layout="prefix", pos_grid=4,
              mlp="swiglu", mlp_hidden=64),
    ViTConfig(patch_size=8, embed_dim=48, depth=2, num_heads=4, reg_tokens=8, pos_layout="patches", pos_grid=4,
              mlp="swiglu", mlp_hidden=64),
    ViTConfig(patch_size=8, embed_dim=48, depth=3, num_heads=4, reg_tokens=0, pos_layout="patches", pos_grid=4,
              mlp="gelu", mlp_hidden=96, layer_scale=False),
    ViTConfig(patch_size=8, embed_dim=48, depth=2, num_heads=6, reg_tokens=2, pos_layout="prefix", pos_grid=4,
              mlp="gelu", mlp_hidden=96, qkv_bias=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["prefix-swiglu", "patches-swiglu", "gelu-noLS", "prefix-nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inference_path_is_bit_identical_to_reference_blocks(cfg, dtype):
    m = random_vit(cfg, seed=5).to(dtype)
    m.gemm = "aten"  # the reference GEMM kernels: every rounding step as in Block.forward
    for size in [(32, 32), (40, 56)]:  # native grid and resampled positions
        x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1)).to(dtype)
        with torch.inference_mode():
            fast = m.forward_features(x)
        assert m.workspace.buffers, "the inference path was not taken"
        assert torch.equal(fast, reference(m, x))


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=["prefix-swiglu", "patches-swiglu", "gelu-noLS"])
def test_onednn_gemms_are_fp32_accurate(cfg):
    """oneDNN GEMMs (default on CPU): not bit-identical to the BLAS path, but as close to an fp64
    forward as the BLAS path is (both are fp32 roundings; differences well under 1e-5)."""
    m = random_vit(cfg, seed=5)
    x = torch.randn(3, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        m.gemm = "onednn"
        fast = m.forward_features(x)
        m.gemm = "aten"
        blas = m.forward_features(x)
    truth = reference(random_vit(cfg, seed=5).double(), x.double())
    err_fast = (fast.double() - truth).abs().max().item()
    err_blas = (blas.double() - truth).abs().max().item()
    assert (fast - blas).abs().max() < 1e-5
    assert err_fast < 1e-5 and err_fast < 10 * err_blas + 1e-7
    with pytest.raises(ValueError, match="oneDNN"):
        with torch.inference_mode():
            m.gemm = "onednn"
            m.double().forward_features(x.double())  # fp64 has no oneDNN GEMM: an error, not a silent switch


def test_results_never_alias_the_reused_buffers():
    m = random_vit(preset_config("vit-t8-demo"), seed=0)
    m.gemm = "aten"  # every activation in a workspace buffer
    x1, x2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = m.forward_features(x1)
        a_copy = a.clone()
        b = m.forward_features(x2)  # same shape: reuses every buffer
        c = m.forward_features(torch.randn(5, 3, 64, 64))  # other batch size: buffers reallocated
    assert torch.equal(a, a_copy) and not torch.equal(a, b)
    assert c.shape[0] == 5
    assert torch.equal(b, reference(m, x2))
    assert m.workspace.nbytes() > 0
    m.release_workspace()
    assert m.workspace.nbytes() == 0


def test_reference_path_whenever_gradients_autocast_or_explanations_are_active():
    m = random_vit(preset_config("vit-t8-demo"), seed=0)
    x = torch.randn(2, 3, 64, 64)
    assert usable(m, x) is False  # grad mode on: training and LRP need the autograd graph
    y = m.forward_features(x)
    y.sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None and not m.workspace.buffers
    with torch.no_grad():
        assert usable(m, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not usable(m, x)
        m.keep_attention = True
        assert not usable(m, x)
        m.keep_attention = False
        m.lrp = True
        assert not usable(m, x)


@pytest.mark.parametrize("name", ["vit-t8-demo", "virchow2"])
def test_cls_only_last_block_equals_full_forward_cls_token(name):
    m = random_vit(preset_config(name, depth=2), seed=2).double()
    P = m.cfg.patch_size
    x = torch.randn(2, 3, 4 * P, 6 * P, dtype=torch.float64)
    with torch.no_grad():
        full = m.forward_features(x)[:, 0]
        cls = m.forward_cls(x)
        m.fast_inference = False
        cls_ref_blocks = m.forward_cls(x)
        m.fast_inference = True
    assert cls.shape == (2, m.cfg.embed_dim)
    assert (cls - full).abs().max() < 1e-12
    assert (cls_ref_blocks - full).abs().max() < 1e-12
    # with gradients (plain ops): same value, and the gradient reaches the input
    xg = x.clone().requires_grad_(True)
    g = m.forward_cls(xg)
    assert (g.detach() - full).abs().max() < 1e-12
    g.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_cls_pooling_encoder_uses_the_shortcut_with_the_same_embedding():
    vit = random_vit(preset_config("vit-t8-demo"), seed=3)
    enc = Encoder(vit, Transform(img_size=64), "cls").eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        emb = enc(x)
        ref = pool_tokens(enc.tokens(x), vit.num_prefix_tokens, "cls")
    assert emb.shape == (3, vit.cfg.embed_dim)
    assert (emb - ref).abs().max() < 1e-5


def test_bf16_weights_path_stays_close_to_fp32():
    """Reduced precision with bf16 weights (the inference path runs in bf16 end to end)."""
    m = random_vit(preset_config("vit-t8-demo"), seed=0)
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        ref = m(x)
        low = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.03


def test_the_encoder_takes_uint8_tiles_as_read_and_refuses_other_shapes():
    """From a notebook, enc(uint8 (N, H, W, 3) array) failed with "'numpy.ndarray' has no attribute 'to'" and a
    1-channel tensor was broadcast by the normalisation into a silently wrong embedding."""
    from tubcli.errors import TubError
    from tub_atlas.encoder import load_encoder, uint8_to_float

    enc, _ = load_encoder("vit-t8-demo", random_init=True)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        want = enc(uint8_to_float(tiles))
        assert torch.equal(enc(tiles), want) and torch.equal(enc(torch.from_numpy(tiles)), want)
        with pytest.raises(TubError, match=r"tiles must be \(B, 3, H, W\).*\(2, 1, 64, 64\)"):
            enc(torch.rand(2, 1, 64, 64))


def test_float_tiles_outside_0_1_are_refused_whatever_their_container():
    """A float tensor in 0..255 gave wrong embeddings without a word (max |Δ| 2.4), while the same values as
    a numpy array were divided by 255 when their maximum exceeded 1: a guess per batch."""
    from tubcli.errors import TubError
    from tub_atlas.encoder import load_encoder

    enc, _ = load_encoder("vit-t8-demo", random_init=True)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        for bad in (torch.from_numpy(tiles).permute(0, 3, 1, 2).float(), tiles.astype(np.float32)):
            with pytest.raises(TubError, match=r"float tiles must lie in \[0, 1\], these span 0..255; pass uint8"):
                enc(bad)
        with pytest.raises(TubError, match="these span nan"):
            enc(torch.full((1, 3, 64, 64), float("nan")))
        assert torch.equal(enc(tiles.astype(np.float32) / 255), enc(tiles))  # [0, 1] floats, as uint8
        with pytest.raises(TubError, match=r"integer tiles must lie in 0..255, these \(uint16\) span 0..65535"):
            enc((tiles.astype(np.uint16) * 257))


def test_bf16_goes_to_aten_on_a_cpu_without_onednn_bf16_kernels(monkeypatch):
    """An AVX2-only CPU has no oneDNN bf16 inner product: `bench --precision bf16-weights` failed there with
    "could not create a primitive descriptor"; auto now takes aten's GEMMs, --gemm onednn says why not."""
    from tub_atlas import inference

    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(inference, "onednn_bf16", lambda: False)
    assert inference.use_onednn("auto", x) is False
    assert inference.use_onednn("auto", x.float()) is inference.onednn_available()
    with pytest.raises(ValueError, match="no oneDNN bf16 kernels"):
        inference.use_onednn("onednn", x)
