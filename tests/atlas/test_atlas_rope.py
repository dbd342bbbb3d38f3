"""2-D RoPE ViTs (DINOv3 layout; RudolfV-2 presets): the rotation's analytic properties, exact
checkpoint conversion, the published RudolfV-2 parameter count, and the inference/LRP paths."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from tubcli.errors import TubError
from tub_atlas.checkpoint import build_model, infer_config, read_checkpoint, to_timm_layout
from tub_atlas.presets import PRESETS
from tub_atlas.synthetic import preset_config, random_vit, to_dinov3, zero_k_bias
from tub_atlas.vit import RopeEmbedding, ViTConfig, apply_rope


def _rope_cfg(**kw) -> ViTConfig:
    base = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, reg_tokens=2, pos_layout="rope", pos_grid=4,
                mlp="swiglu", mlp_hidden=96, qk_norm=True)
    base.update(kw)
    return ViTConfig(**base)


def test_rope_scores_depend_only_on_the_offset_and_norms_are_kept():
    """RoPE's defining property (Su et al. 2021): <R(a) q, R(b) k> = f(q, k, a - b)."""
    d, H, W = 16, 5, 7
    rope = RopeEmbedding(d, base=100.0)
    sin, cos = rope((H, W), torch.float64, "cpu")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    qs = apply_rope(q.expand(1, 1, H * W, d), (sin, cos), 0)[0, 0]
    ks = apply_rope(k.expand(1, 1, H * W, d), (sin, cos), 0)[0, 0]
    assert torch.allclose(qs.norm(dim=-1), q.norm().expand(H * W), atol=1e-12)
    scores = qs @ ks.T
    idx = lambda i, j: i * W + j  # noqa: E731
    # the same grid offset (2, -3) from two different anchors gives the same score
    assert abs(scores[idx(0, 3), idx(2, 0)] - scores[idx(1, 4), idx(3, 1)]) < 1e-12
    assert abs(scores[idx(0, 3), idx(2, 0)] - scores[idx(0, 3), idx(1, 0)]) > 1e-3  # a different offset differs
    # analytic angle of one pair: dim 0 rotates by 2*pi*y/p_0 with y = 2*(i+1/2)/H - 1
    y = 2 * (2 + 0.5) / H - 1
    assert math.isclose(cos[idx(2, 5), 0].item(), math.cos(2 * math.pi * y / rope.periods[0].item()), abs_tol=1e-12)


def test_prefix_tokens_are_not_rotated():
    sin, cos = RopeEmbedding(8)((2, 2), torch.float32, "cpu")
    x = torch.randn(1, 1, 3 + 4, 8)
    y = apply_rope(x, (sin, cos), 3)
    assert torch.equal(y[:, :, :3], x[:, :, :3]) and not torch.allclose(y[:, :, 3:], x[:, :, 3:])


def test_positions_matter_and_fast_paths_agree():
    model = random_vit(_rope_cfg(), seed=1)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        model.fast_inference = False
        ref = model.forward_features(x)
        cls = model.forward_cls(x)
        model.fast_inference = True
        fast = model.forward_features(x)
        fast_cls = model.forward_cls(x)
        flipped = model.forward_features(x.flip(-1))
    assert (ref - fast).abs().max() < 1e-5 and (cls - ref[:, 0]).abs().max() < 1e-5
    assert (fast_cls - ref[:, 0]).abs().max() < 1e-5
    assert (flipped[:, 0] - ref[:, 0]).abs().max() > 1e-4  # with positions, mirroring changes the CLS


@pytest.mark.parametrize("rule", ["cp", "attn"])
def test_lrp_balance_holds_through_rope_and_qk_norm(rule):
    """f = pixels + additive terms (+ AttnLRP's softmax biases): RoPE is a fixed linear map and the
    q/k LayerNorms take the LN rule, so the balance sheet closes as for learned positions."""
    from tub_atlas.encoder import Encoder, Transform
    from tub_atlas.lrp import make_target, relevance_budget

    cfg = _rope_cfg()
    enc = Encoder(random_vit(cfg, seed=2).double(), Transform(img_size=40), "cls+mean")
    x01 = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = relevance_budget(enc, x01, make_target("dim", 3), rule)
    assert abs(b["input"] + b["additive"] + b["softmax"] - b["f"]) <= 1e-9 * abs(b["f"])
    assert abs(b["input"]) > 1e-3 * abs(b["f"])
    assert (b["softmax"] != 0) == (rule == "attn")


def test_dinov3_checkpoint_converts_exactly(tmp_path):
    cfg = _rope_cfg(qk_norm=False, norm_eps=1e-5)
    model = zero_k_bias(random_vit(cfg, seed=3)).double()
    dino = to_dinov3(model.state_dict())
    assert {"storage_tokens", "mask_token", "rope_embed.periods", "blocks.0.mlp.w1.weight",
            "blocks.0.attn.qkv.bias_mask"} <= set(dino)
    torch.save({"model": dino}, tmp_path / "dinov3.pth")
    got, sd, _ = read_checkpoint(tmp_path / "dinov3.pth")
    assert (got.pos_layout, got.num_heads, got.reg_tokens, got.mlp, got.qk_norm, got.norm_eps) == \
        ("rope", 4, 2, "swiglu", False, 1e-5)
    assert math.isclose(got.rope_base, 100.0, rel_tol=1e-6)
    x = torch.randn(1, 3, 32, 40, dtype=torch.float64)
    with torch.no_grad():
        assert (build_model(got, sd).double()(x) - model(x)).abs().max() < 1e-12


def test_masked_k_bias_is_applied_not_loaded():
    model = zero_k_bias(random_vit(_rope_cfg(qk_norm=False), seed=3))
    dino = to_dinov3(model.state_dict())
    sd = to_timm_layout(dino)
    n = sd["blocks.0.attn.qkv.bias"].shape[0] // 3
    assert dino["blocks.0.attn.qkv.bias"][n:2 * n].abs().max() > 0.1
    assert sd["blocks.0.attn.qkv.bias"][n:2 * n].abs().max() == 0
    dino["blocks.0.attn.qkv.bias_mask"] = torch.full_like(dino["blocks.0.attn.qkv.bias_mask"], float("nan"))
    with pytest.raises(TubError, match="uninitialised"):
        to_timm_layout(dino)


def test_rope_heads_come_from_the_periods_and_contradictions_are_errors():
    sd = random_vit(_rope_cfg(), seed=0).state_dict()
    assert infer_config(sd).num_heads == 4  # width 64 is not in the width table: the periods say 16-wide heads
    with pytest.raises(TubError, match="contradict the RoPE periods"):
        infer_config(sd, num_heads=8)


def test_rudolfv2_preset_has_the_published_parameter_count():
    """1,133,789,200 tensors' entries in the published RudolfV-2 weights = parameters + 16 RoPE periods."""
    cfg = preset_config("rudolfv-2")
    assert cfg.num_params() + cfg.embed_dim // cfg.num_heads // 4 == 1_133_789_200
    assert round(preset_config("rudolfv-2-b").num_params() / 1e6, 1) == 85.2
    assert round(preset_config("rudolfv-2-s").num_params() / 1e6, 1) == 21.4


def test_hf_style_rudolfv2_s_checkpoint_loads_with_its_preset(tmp_path):
    """`model.`-prefixed keys, `register_tokens`, a period buffer under another module name."""
    cfg = preset_config("rudolfv-2-s", depth=1)
    model = random_vit(cfg, seed=4)
    sd = {("model." + k).replace("reg_token", "register_tokens").replace("rope_embed.", "rope."): v.contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "rudolfv2s.safetensors"))
    got, lsd, _ = read_checkpoint(tmp_path / "rudolfv2s.safetensors", preset=PRESETS["rudolfv-2-s"])
    assert (got.pos_layout, got.qk_norm, got.num_heads, got.reg_tokens) == ("rope", True, 6, 8)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(build_model(got, lsd)(x), model(x))


def test_rope_checkpoint_without_periods_is_a_clear_error(tmp_path):
    """No pos_embed and no period buffer: positions live in code; say so instead of blaming DINOv2."""
    model = random_vit(preset_config("rudolfv-2-s", depth=1), seed=4)
    sd = {("model." + k).replace("reg_token", "register_tokens"): v.contiguous()
          for k, v in model.state_dict().items() if not k.endswith("periods")}
    save_file(sd, str(tmp_path / "noperiods.safetensors"))
    with pytest.raises(TubError, match=r"neither a position table \(pos_embed\) nor a RoPE period buffer"):
        read_checkpoint(tmp_path / "noperiods.safetensors", preset=PRESETS["rudolfv-2-s"])


def test_ssl_backbone_pass_uses_rope():
    """DINOv2-style self-supervision trains RoPE students with the same forward as inference."""
    from tub_atlas.dinov2_ssl import backbone_tokens

    vit = random_vit(_rope_cfg(), seed=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (backbone_tokens(vit, x) - vit.forward_features(x)).abs().max() < 1e-5


def test_periods_stay_fp32_under_half_precision():
    model = random_vit(_rope_cfg(), seed=0).to(torch.bfloat16)
    assert model.rope_embed.periods.dtype == torch.float32
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_unverified_preset_says_so(caplog):
    from tub_atlas.encoder import load_encoder

    with caplog.at_level("WARNING", logger="tub.atlas"):
        enc, info = load_encoder("rudolfv-2-s", random_init=True)
    assert "unverified" in caplog.text and "DINOv3 layout assumed" in caplog.text
    assert enc.dim == 768 and info["vit"]["pos_layout"] == "rope"
