"""Shape inference, save/inspect/reload round trips and DINOv2 conversion (spec §2.1, §2.6; §6 targets 3-4)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tubcli.errors import TubError
from tub_atlas.checkpoint import (apply_preset, build_model, infer_config, model_json, read_checkpoint,
                                  save_weights, to_timm_layout)
from tub_atlas.presets import PRESETS
from tub_atlas.synthetic import preset_config, random_vit, to_dinov2
from tub_atlas.vit import ViTConfig

SHAPES = {  # preset -> (P, D, R, layout, mlp, fc1, hidden)
    "uni2-h": (14, 1536, 8, "patches", "swiglu", 8192, 4096),
    "virchow2": (14, 1280, 4, "prefix", "swiglu", 6832, 3416),
    "h-optimus-0": (14, 1536, 4, "patches", "swiglu", 8192, 4096),
    "h-optimus-1": (14, 1536, 4, "patches", "swiglu", 8192, 4096),
    "vit-s8-reg8": (8, 384, 8, "patches", "gelu", 1536, 1536),
    "rudolfv-2-s": (8, 384, 8, "rope", "swiglu", 2048, 1024),
    "rudolfv-2-b": (8, 768, 8, "rope", "swiglu", 4096, 2048),
    "vit-t8-demo": (8, 192, 4, "patches", "gelu", 768, 768),
}


def _x(size, seed=0):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SHAPES))
def test_preset_checkpoint_round_trip(tmp_path, name):
    depth = 12 if name == "vit-s8-reg8" else (2 if name == "vit-t8-demo" else 1)
    cfg = preset_config(name, depth=depth)
    model = random_vit(cfg, seed=5)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # no model.json
    got, sd, meta = read_checkpoint(path, preset=PRESETS[name])
    P, D, R, layout, mlp, fc1, hidden = SHAPES[name]
    assert (got.patch_size, got.embed_dim, got.depth, got.reg_tokens, got.pos_layout, got.mlp, got.fc1_out,
            got.mlp_hidden, got.layer_scale) == (P, D, depth, R, layout, mlp, fc1, hidden, True)
    assert got.num_heads == cfg.num_heads and meta == {}
    reloaded = build_model(got, sd)
    x = _x(cfg.img_size)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_heads_come_from_model_json_beside_the_weights(tmp_path):
    cfg = ViTConfig(patch_size=8, embed_dim=64, depth=1, num_heads=2, reg_tokens=0, pos_grid=2, mlp_hidden=32)
    model = random_vit(cfg)
    path = tmp_path / "w.safetensors"
    with pytest.raises(TubError, match="head count"):
        infer_config(model.state_dict())  # width 64 is not in the table
    save_weights(path, model.state_dict(), model_json(cfg, norm="imagenet"))
    got, _, meta = read_checkpoint(path)
    assert got.num_heads == 2 and meta["vit"]["num_heads"] == 2 and (tmp_path / "w.json").is_file()


@pytest.mark.parametrize("name", ["uni2-h", "vit-t8-demo"])
def test_dinov2_conversion_with_registers_matches_direct_build(tmp_path, name):
    cfg = preset_config(name, depth=2 if name == "vit-t8-demo" else 1)
    model = random_vit(cfg, seed=1).double()  # fp64: the fake's cls - pos fold must not round
    dino = to_dinov2(model.state_dict(), prefix="teacher.backbone.", chunks=2)
    assert "teacher.backbone.register_tokens" in dino and "teacher.backbone.mask_token" in dino
    assert any(".blocks.0.0." in k for k in dino)
    if cfg.mlp == "swiglu":
        assert any(".mlp.w12." in k for k in dino)
    torch.save({"teacher": dino}, tmp_path / "dino.pth")  # nested dict, prefixes, chunked blocks
    got, sd, _ = read_checkpoint(tmp_path / "dino.pth", preset=PRESETS[name])
    assert got.pos_layout == "patches" and got.reg_tokens == cfg.reg_tokens
    x = _x(cfg.img_size).double()
    with torch.no_grad():
        assert (build_model(got, sd).double()(x) - model(x)).abs().max() <= 1e-6


def test_dinov2_conversion_without_registers_keeps_prefix_layout(tmp_path):
    cfg = ViTConfig(patch_size=8, embed_dim=384, depth=2, num_heads=6, reg_tokens=0, pos_layout="prefix",
                    pos_grid=4, mlp="swiglu", mlp_hidden=256)
    model = random_vit(cfg, seed=2)
    dino = {("module." + k).replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
            for k, v in model.state_dict().items()}
    dino["module.mask_token"] = torch.zeros(1, 384)
    sd = to_timm_layout(dino)
    got = infer_config(sd)
    assert got.pos_layout == "prefix" and got.reg_tokens == 0 and got.mlp == "swiglu"
    x = _x(32)
    with torch.no_grad():
        assert (build_model(got, sd)(x) - model(x)).abs().max() <= 1e-6


def test_unknown_keys_are_listed_not_dropped():
    sd = random_vit(preset_config("vit-t8-demo", depth=1)).state_dict()
    sd["fc_norm.weight"] = torch.ones(192)
    sd["blocks.0.attn.norm.weight"] = torch.ones(192)  # EVA's scale-norm: not a layout tub knows
    with pytest.raises(TubError, match=r"blocks\.0\.attn\.norm\.weight, fc_norm\.weight"):
        infer_config(sd)


def test_qk_norm_in_one_block_only_is_inconsistent():
    sd = random_vit(preset_config("vit-t8-demo", depth=2)).state_dict()
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(64)
    with pytest.raises(TubError, match="inconsistent across blocks"):
        infer_config(sd)


def test_head_is_ignored_but_other_extras_are_not():
    sd = random_vit(preset_config("vit-t8-demo", depth=1)).state_dict()
    sd["head.weight"] = torch.zeros(10, 192)
    assert "head.weight" not in to_timm_layout(sd)


@pytest.mark.parametrize("break_it,message", [
    (lambda sd: sd.__setitem__("blocks.1.attn.qkv.weight", torch.zeros(100, 192)), "inconsistent tensor shapes"),
    (lambda sd: sd.pop("blocks.1.norm2.bias"), "missing blocks.1.norm2.bias"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("blocks.0.")], r"blocks \[0\] are missing"),
    (lambda sd: sd.__setitem__("pos_embed", torch.zeros(1, 70, 192)), "neither a square"),
    (lambda sd: sd.__setitem__("blocks.0.mlp.fc1.weight", torch.zeros(700, 192)), "neither equal"),
])
def test_inconsistent_checkpoints_are_clear_errors(break_it, message):
    sd = dict(random_vit(preset_config("vit-t8-demo")).state_dict())
    break_it(sd)
    with pytest.raises(TubError, match=message):
        infer_config(sd)


def test_preset_mismatch_is_an_error():
    cfg = infer_config(random_vit(preset_config("vit-t8-demo", depth=1)).state_dict())
    with pytest.raises(TubError, match="does not match preset uni2-h"):
        apply_preset(cfg, PRESETS["uni2-h"])


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(TubError, match="cannot read checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(TubError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


def test_an_empty_or_foreign_checkpoint_is_named(tmp_path):
    from tubcli.testing import expect_error_line, invoke

    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "labels.pth").write_text("slide_id,label\n")
    expect_error_line(invoke(["atlas", "inspect", tmp_path / "empty.pth", "-o", tmp_path / "a"]), "is empty")
    expect_error_line(invoke(["atlas", "inspect", tmp_path / "labels.pth", "-o", tmp_path / "b"]),
                      "not a PyTorch checkpoint")
