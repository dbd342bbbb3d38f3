"""QA "atlasvit" fixes: non-finite weights and embeddings, which settings file is read, --heads against a
preset, DINOv2 training heads and Hugging Face layouts in convert, bf16 preprocessing through
``load_encoder``, and the EXIF orientation warning. Tiny random-weight checkpoints made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tubcli.errors import TubError
from tubcli.testing import expect_error_line, invoke
from tub_atlas.synthetic import preset_config, random_vit, to_dinov2


def atlas(*args, code: int = 0):
    r = invoke(["atlas", *map(str, args)])
    assert r.exit_code == code, r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    return r


def demo_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in random_vit(preset_config("vit-t8-demo"), seed=seed).state_dict().items()}


def save(path: Path, sd: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))  # no <stem>.json
    return path


def tile_folder(folder: Path, n: int = 2, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"s_{64 * i}_0.png")
    return folder


def failures(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ 1: non-finite weights and embeddings
def test_non_finite_weights_are_a_one_line_error_naming_the_first_tensor(tmp_path):
    from tub_atlas.checkpoint import read_checkpoint

    sd = demo_sd()
    sd["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    sd["norm.weight"][3] = float("inf")
    w = save(tmp_path / "nan.safetensors", sd)
    torch.save({"teacher": to_dinov2(sd)}, tmp_path / "nan.pth")
    with pytest.raises(TubError, match=r"blocks\.0\.mlp\.fc1\.weight holds NaN or inf \(1 of .*1 more tensors"):
        read_checkpoint(w)
    expect_error_line(atlas("inspect", w, "-o", tmp_path / "i", code=2), "blocks.0.mlp.fc1.weight", "NaN or inf")
    expect_error_line(atlas("inspect", tmp_path / "nan.pth", "-o", tmp_path / "i2", code=2), "NaN or inf")
    expect_error_line(atlas("convert", w, tmp_path / "c.safetensors", "-o", tmp_path / "c", code=2), "NaN or inf")
    assert not (tmp_path / "c.safetensors").exists()
    tiles = tile_folder(tmp_path / "t")
    for verb in ("embed", "explain"):
        expect_error_line(atlas(verb, tiles, "--arch", "vit-t8-demo", "--weights", w, "-o", tmp_path / verb, code=2),
                          "blocks.0.mlp.fc1.weight")


def test_non_finite_embeddings_and_maps_fail_their_input(tmp_path):
    """Finite weights whose activations overflow (the fp16 case in fp32): the input is a failures.jsonl line
    naming the tile, exit 1, and no output is written."""
    sd = demo_sd()
    sd["patch_embed.proj.weight"].fill_(3e38)  # finite, but the patch embedding overflows to inf
    w = save(tmp_path / "huge.safetensors", sd)
    bad = tile_folder(tmp_path / "bad")
    r = atlas("embed", bad, "--arch", "vit-t8-demo", "--weights", w, "-o", tmp_path / "e", code=1)
    (line,) = failures(tmp_path / "e")
    assert line["item"].endswith("bad") and "s_0_0.png" in line["error"] and "NaN or inf" in line["error"]
    assert not (tmp_path / "e/outputs/bad").exists() and "NaN or inf" in r.stderr
    r = atlas("explain", bad, "--arch", "vit-t8-demo", "--weights", w, "--method", "rollout",
              "-o", tmp_path / "x", code=1)
    (line,) = failures(tmp_path / "x")
    assert "s_0_0.png" in line["error"] and "NaN or inf" in line["error"]
    assert not (tmp_path / "x/outputs/bad").exists()


def test_non_finite_message_names_fp16_overflow():
    from tub_atlas.embedding import non_finite_message
    from tub_atlas.tiles import TileSet

    ts = TileSet("a", [{"origin": f"/d/a/{i}.png"} for i in range(4)])
    msg = non_finite_message(ts, 2, torch.tensor([True, False]), torch.float16)
    assert msg.startswith("/d/a/3.png: ") and "fp16" in msg and "--precision bf16" in msg
    assert "of 1 more" in non_finite_message(ts, 0, torch.tensor([False, False]), None)


# ------------------------------------------------------------------ 2: which settings file is read
def test_a_generic_model_json_is_not_read_and_the_stem_json_is_said(tmp_path):
    """A model.json of another model beside weights of another name once replaced heads, normalisation,
    input size and pooling silently; only <stem>.json is read, recorded in encoder.json, and a WARNING
    names it where it contradicts the explicit preset."""
    from tub_atlas.checkpoint import model_json
    from tub_atlas.vit import ViTConfig

    folder = tmp_path / "ck"
    w = save(folder / "a.safetensors", demo_sd())
    other = model_json(ViTConfig(patch_size=8, embed_dim=192, depth=2, num_heads=6, reg_tokens=4, pos_grid=8,
                                 mlp_hidden=768), norm="h-optimus", pool="cls", img_size=32)
    (folder / "model.json").write_text(json.dumps(other))
    tiles = tile_folder(tmp_path / "t")
    r = atlas("embed", tiles, "--arch", "vit-t8-demo", "--weights", w, "-o", tmp_path / "e1")
    enc = json.loads((tmp_path / "e1/encoder.json").read_text())
    assert enc["vit"]["num_heads"] == 3 and enc["pool"] == "cls+mean" and enc["transform"]["img_size"] == 64
    assert enc["transform"]["mean"] == [0.485, 0.456, 0.406] and "model.json" not in r.stderr
    assert "settings_file" not in enc
    # the same file under the weights' stem is read: recorded, and its differences from the preset warned about
    (folder / "model.json").rename(folder / "a.json")
    r = atlas("embed", tiles, "--arch", "vit-t8-demo", "--weights", w, "-o", tmp_path / "e2", "-v")
    debug = [ln for ln in r.stderr.splitlines() if "settings from" in ln]
    assert len(debug) == 1 and "a.json" in debug[0]
    assert "norm h-optimus" in debug[0] and "img size 32" in debug[0] and "pool cls" in debug[0]
    warn = [ln for ln in r.stderr.splitlines() if "differs from preset vit-t8-demo" in ln]
    assert len(warn) == 1 and "WARNING" in warn[0]
    for part in ("heads 6 (preset 3", "norm h-optimus (preset imagenet)", "img size 32 (preset 64)",
                 "pool cls (preset cls+mean)", "--norm"):
        assert part in warn[0], warn[0]
    enc = json.loads((tmp_path / "e2/encoder.json").read_text())
    assert enc["vit"]["num_heads"] == 3 and enc["pool"] == "cls" and enc["transform"]["img_size"] == 32
    assert enc["settings_file"] == {"file": str(folder / "a.json"),
                                    "set": ["norm h-optimus", "img size 32", "pool cls"]}
    # inspect names the file the heads came from; a generic model.json is not it
    (folder / "a.json").rename(folder / "model.json")
    out = json.loads(atlas("inspect", w, "--json", "-o", tmp_path / "i").stdout)
    assert out["num_heads"] == 3 and out["heads_from"].startswith("width table")


# ------------------------------------------------------------------ 3: --heads against a preset
def test_heads_contradicting_the_preset_are_a_usage_error(tmp_path):
    w = save(tmp_path / "w.safetensors", demo_sd())
    tiles = tile_folder(tmp_path / "t")
    expect_error_line(atlas("embed", tiles, "--arch", "vit-t8-demo", "--weights", w, "--heads", "6",
                            "-o", tmp_path / "e", code=2), "--heads 6", "vit-t8-demo", "3 heads")
    expect_error_line(atlas("convert", w, tmp_path / "c.safetensors", "--preset", "vit-t8-demo", "--heads", "6",
                            "-o", tmp_path / "c", code=2), "--heads 6", "vit-t8-demo", "3 heads", "--preset")
    expect_error_line(atlas("explain", tiles, "--arch", "vit-t8-demo", "--random-init", "--heads", "4",
                            "-o", tmp_path / "x", code=2), "--heads 4", "3 heads")
    atlas("embed", tiles, "--arch", "vit-t8-demo", "--weights", w, "--heads", "3", "-o", tmp_path / "same")
    # a preset that leaves the count open takes --heads
    atlas("embed", tiles, "--arch", "atlas2-s", "--weights", w, "--heads", "6", "--img-size", "64",
          "-o", tmp_path / "open")
    assert json.loads((tmp_path / "open/encoder.json").read_text())["vit"]["num_heads"] == 6


# ------------------------------------------------------------------ 4: convert: SSL heads, HF layout, messages
def test_convert_drops_dinov2_ssl_heads_with_an_info_line(tmp_path):
    sd = demo_sd()
    dino = to_dinov2(sd, prefix="backbone.", chunks=2)
    heads = {"dino_head.mlp.0.weight": torch.randn(16, 192), "dino_head.last_layer.weight_g": torch.ones(32, 1),
             "ibot_head.mlp.0.weight": torch.randn(16, 192)}
    torch.save({"teacher": {**dino, **heads}}, tmp_path / "teacher_checkpoint.pth")
    torch.save({"teacher": dino}, tmp_path / "plain.pth")
    r = atlas("convert", tmp_path / "teacher_checkpoint.pth", tmp_path / "a.safetensors", "--preset", "vit-t8-demo",
              "-o", tmp_path / "c1")
    said = [ln for ln in r.stderr.splitlines() if "self-supervision heads" in ln]
    assert len(said) == 1 and "INFO" in said[0] and "dino_head.*, ibot_head.*: 3 tensors" in said[0]
    atlas("convert", tmp_path / "plain.pth", tmp_path / "b.safetensors", "--preset", "vit-t8-demo",
          "-o", tmp_path / "c2")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("_head." in k for k in a)
    out = json.loads(atlas("inspect", tmp_path / "teacher_checkpoint.pth", "--json", "-o", tmp_path / "i").stdout)
    assert out["ignored_keys"] == sorted(heads) and out["depth"] == 2


def test_unknown_keys_inside_convert_do_not_send_the_user_to_convert(tmp_path):
    sd = demo_sd()
    sd["fc_norm.weight"] = torch.ones(192)
    w = save(tmp_path / "w.safetensors", sd)
    line = expect_error_line(atlas("convert", w, tmp_path / "c.safetensors", "-o", tmp_path / "c", code=2),
                             "fc_norm.weight", "remove them")
    assert "convert it" not in line and "(tub atlas convert" not in line
    line = expect_error_line(atlas("inspect", w, "-o", tmp_path / "i", code=2), "fc_norm.weight")
    assert "tub atlas convert" in line  # outside convert, converting is a way out


def test_hugging_face_dinov2_layout_is_named_as_unsupported(tmp_path):
    D = 192
    hf = {"embeddings.cls_token": torch.zeros(1, 1, D), "embeddings.mask_token": torch.zeros(1, D),
          "embeddings.register_tokens": torch.zeros(1, 4, D), "embeddings.position_embeddings": torch.zeros(1, 65, D),
          "embeddings.patch_embeddings.projection.weight": torch.zeros(D, 3, 8, 8),
          "encoder.layer.0.attention.attention.query.weight": torch.zeros(D, D),
          "encoder.layer.0.layer_scale1.lambda1": torch.ones(D), "layernorm.weight": torch.ones(D)}
    w = save(tmp_path / "hf.safetensors", hf)
    for args in (["convert", w, tmp_path / "c.safetensors"], ["inspect", w]):
        line = expect_error_line(atlas(*args, "-o", tmp_path / args[0], code=2),
                                 "Hugging Face transformers layout", "no converter")
        assert "convert it" not in line
    torch.save({"model": {f"dinov2.{k}": v for k, v in hf.items()}}, tmp_path / "hf.pth")
    expect_error_line(atlas("inspect", tmp_path / "hf.pth", "-o", tmp_path / "i2", code=2),
                      "Hugging Face transformers layout")


# ------------------------------------------------------------------ 5: bf16 weights through load_encoder
def test_bf16_load_encoder_preprocesses_in_float32_and_resizes(tmp_path):
    """The tub_patch_encoders hook passes dtype=bfloat16: tiles that need resizing once raised
    NotImplementedError (no bf16 antialias kernel), and pixels were quantised to bf16 before resizing."""
    from tub_atlas.encoder import load_encoder
    from tub_atlas.encoders import load_vit_t8_demo

    w = save(tmp_path / "w.safetensors", demo_sd())
    enc16, _ = load_encoder("vit-t8-demo", w, dtype=torch.bfloat16)
    enc32, _ = load_encoder("vit-t8-demo", w)
    x = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))  # resized to 64
    with torch.no_grad():
        a, b = enc16(x).float(), enc32(x)  # was NotImplementedError: "compute_index_ranges_weights" for BFloat16
        assert a.shape == (2, 384) and 0 < float((a - b).norm() / b.norm()) < 3e-2
        pre = enc16.preprocess(x)
        assert pre.dtype == torch.bfloat16 and torch.equal(pre, enc32.preprocess(x).to(torch.bfloat16))
        hook = load_vit_t8_demo(w, "cpu", torch.bfloat16)
        assert torch.equal(hook(x), enc16(x))
        assert enc32.double().preprocess(x).dtype == torch.float64  # fp64 models preprocess in fp64


# ------------------------------------------------------------------ 6: EXIF orientation
def test_exif_orientation_is_warned_once_per_run_and_not_applied(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(pixels).save(tmp_path / folder / f"{folder}_0_0.jpg", quality=95, exif=exif.tobytes())
    (tmp_path / "plain").mkdir()
    Image.fromarray(pixels).save(tmp_path / "plain" / "s_0_0.jpg", quality=95)
    enc = ["--arch", "vit-t8-demo", "--random-init"]
    r = atlas("embed", tmp_path / "a", tmp_path / "b", *enc, "-o", tmp_path / "e")
    said = [ln for ln in r.stderr.splitlines() if "EXIF orientation" in ln]
    assert len(said) == 1 and "WARNING" in said[0] and str(tmp_path / "a" / "a_0_0.jpg") in said[0]
    assert "orientation 6" in said[0] and "as their pixels are stored" in said[0]
    r = atlas("embed", tmp_path / "plain", *enc, "-o", tmp_path / "p")
    assert "EXIF" not in r.stderr
    rotated = np.load(tmp_path / "e/outputs/a/embeddings.npy")
    assert np.array_equal(rotated, np.load(tmp_path / "p/outputs/plain/embeddings.npy"))  # the stored pixels
    r = atlas("explain", tmp_path / "a", *enc, "--method", "rollout", "-o", tmp_path / "x")
    assert sum("EXIF orientation 6" in ln for ln in r.stderr.splitlines()) == 1
