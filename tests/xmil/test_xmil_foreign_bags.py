"""A model trained on bags another tool made (tub atlas embed, TRIDENT): heatmapping its slides re-embeds
them only where the same tiles and encoder can be had (--coords-dir, an encoder the hook offers), and says
so where a bag differs from the training bags. Tiny random model, no training."""

import json

import h5py
import numpy as np
import pytest
import torch

from tubcli.testing import expect_error_line, invoke

from tub_xmil.checkpoint import build_model
from tub_xmil.synthetic import render_slide, write_pyramid

DIM = 8  # the tiny test encoder's (tests/xmil/conftest.py)


def _ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def _model(folder, features: dict, dim: int = DIM):
    """An untrained AttnMIL checkpoint whose model.json records the training bags' provenance."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = build_model("attnmil", dim, 2, features_dim=8, inner_attention_dim=4).eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({
        "arch": "attnmil", "task": "classification", "classes": ["0", "1"], "features": features,
        "kwargs": {"input_dim": dim, "head_dim": 2, "features_dim": 8, "inner_attention_dim": 4}}))
    return folder


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    img, _, _ = render_slide(1024, 768, positive=True, seed=1)
    return write_pyramid(d / "s1.tiff", img, mpp=0.5)


def _patches(folder, coords, size0=128):
    """A patches file of another tiler: coords and a tile size, no xmil tissue filter."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "s1.h5", "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        d.attrs.update({"patch_size": 128, "patch_size_level0": size0, "patch_level": 0, "target_mpp": 0.5,
                        "min_tissue_proportion": 0.25})
    return folder


def test_slides_are_embedded_at_the_tiles_of_coords_dir(tmp_path, slide, tiny_encoder):
    coords = [[128, 128], [256, 128], [384, 256]]
    patches = _patches(tmp_path / "atlas_tiles", coords)
    model = _model(tmp_path / "m", {"encoder": tiny_encoder, "target_mpp": 0.5, "patch_size": 128})
    res = _ok(invoke(["xmil", "heatmap", slide, "--model", model, "--method", "attention", "--coords-dir", patches,
                      "-o", tmp_path / "hm", "--json"]))
    out = json.loads((tmp_path / "hm" / "outputs" / "s1_attention_scores.json").read_text())
    assert out["coords"] == coords and out["patch_size_level0_source"] == "patches file in --coords-dir"
    assert json.loads(res.stdout)["slides"]["source"]["tiles"] == "--coords-dir"
    assert "tiled by another tool" not in res.stderr
    # without it, xmil's own detector tiles the slide: said, since its tiles need not be the model's
    res = _ok(invoke(["xmil", "heatmap", slide, "--model", model, "--method", "attention", "-o", tmp_path / "hm2"]))
    assert "tiled by another tool" in res.stderr and "--coords-dir" in res.stderr
    # a tiler that found no tissue left an empty patches file: named, not a numpy error
    empty = _patches(tmp_path / "empty_tiles", np.zeros((0, 2)))
    for verb in (["heatmap", slide, "--model", model], ["features", slide, "--encoder", tiny_encoder]):
        res = invoke(["xmil", *verb, "--coords-dir", empty, "-o", tmp_path / f"e_{verb[0]}"])
        assert res.exit_code == 1 and "s1.h5: holds no tiles (its tiler found no tissue" in res.stderr
    # tiling flags contradict the patches files; feature files hold their own coords
    expect_error_line(invoke(["xmil", "heatmap", slide, "--model", model, "--coords-dir", patches, "--patch-size",
                              "64", "-o", tmp_path / "hm3"]), "--patch-size do not apply with --coords-dir")


def test_features_no_encoder_offers_are_refused_not_re_embedded(tmp_path, slide, tiny_encoder):
    """atlas embed --pool mean records an encoder name no hook loader has: the preset's loader would pool by
    CLS and give the model features it never saw, with a plausible-looking heatmap."""
    model = _model(tmp_path / "m", {"encoder": "tub atlas uni2-h (pool mean)", "target_mpp": 0.5,
                                    "patch_size": 128})
    res = invoke(["xmil", "heatmap", slide, "--model", model, "-o", tmp_path / "hm"])
    expect_error_line(res, "embedded by tub atlas uni2-h (pool mean), which no patch encoder offers")
    assert "heatmap their feature files" in res.stderr and not (tmp_path / "hm").exists()
    res = _ok(invoke(["xmil", "heatmap", slide, "--model", model, "--encoder", tiny_encoder, "--method",
                      "attention", "-o", tmp_path / "hm2"]))  # the user's choice, but said
    assert "trained on features with encoder tub atlas uni2-h (pool mean); --encoder tiny-test" in res.stderr


def test_a_bag_unlike_the_training_bags_is_warned(tmp_path, tiny_encoder):
    model = _model(tmp_path / "m", {"encoder": "uni2-h", "target_mpp": 0.5, "patch_size": 224})
    bag = tmp_path / "b" / "s2.h5"
    bag.parent.mkdir()
    with h5py.File(bag, "w") as f:
        f.attrs.update({"encoder": "virchow2"})
        f.create_dataset("features", data=np.random.default_rng(0).standard_normal((4, DIM)).astype(np.float32))
        d = f.create_dataset("coords", data=np.array([[0, 0], [448, 0], [0, 448], [448, 448]]))
        d.attrs.update({"target_mpp": 1.0, "patch_size": 112, "patch_size_level0": 224})
    for verb in (["heatmap", bag], ["explain", bag]):
        res = _ok(invoke(["xmil", *verb, "--model", model, "--method", "attention", "-o", tmp_path / verb[0]]))
        assert "s2.h5: its tiles are at 1 µm/px, the model was trained on bags at 0.5 µm/px" in res.stderr
        assert "s2.h5: embedded by virchow2, the model was trained on bags embedded by uni2-h" in res.stderr
        assert "s2.h5: its tiles are 112 px, the model was trained on bags of 224 px tiles" in res.stderr
    expect_error_line(invoke(["xmil", "heatmap", bag, "--model", model, "--coords-dir", tmp_path, "-o",
                              tmp_path / "x"]), "--coords-dir gives the tiles of slide inputs")


def test_a_tub_atlas_checkpoint_embeds_slides_by_its_own_settings(tmp_path, slide):
    """`--encoder atlas` takes any tub atlas checkpoint (a trained student, Atlas 2) with the settings of
    the model.json beside it; the features record the weights' digest, which heatmap compares."""
    pytest.importorskip("tub_atlas")
    from tub_atlas.checkpoint import model_json, save_weights
    from tub_atlas.synthetic import preset_config, random_vit

    cfg = preset_config("vit-t8-demo")
    weights = tmp_path / "student.safetensors"
    save_weights(weights, random_vit(cfg, seed=1).state_dict(), model_json(cfg, norm="h-optimus", pool="mean",
                                                                           img_size=96))
    patches = _patches(tmp_path / "tiles", [[128, 128], [256, 128]])
    res = _ok(invoke(["xmil", "features", slide, "--encoder", "atlas", "--weights", weights, "--coords-dir", patches,
                      "-o", tmp_path / "f", "--json"]))
    assert json.loads(res.stdout)["dim"] == 192
    with h5py.File(tmp_path / "f" / "outputs" / "features" / "s1.h5") as f:
        assert f["features"].shape == (2, 192) and f.attrs["encoder"] == "atlas"
        assert f.attrs["encoder_tile_size"] == 96 and len(f.attrs["encoder_weights_sha256"]) == 64
        digest = f.attrs["encoder_weights_sha256"]
    model = _model(tmp_path / "m", {"encoder": "atlas", "encoder_weights_sha256": digest}, dim=192)
    res = _ok(invoke(["xmil", "heatmap", slide, "--model", model, "--weights", weights, "--coords-dir", patches,
                      "--method", "attention", "-o", tmp_path / "hm"]))
    assert "are not the weights" not in res.stderr
    other = tmp_path / "other.safetensors"
    save_weights(other, random_vit(cfg, seed=2).state_dict(), model_json(cfg, norm="h-optimus", pool="mean",
                                                                         img_size=96))
    res = _ok(invoke(["xmil", "heatmap", slide, "--model", model, "--weights", other, "--coords-dir", patches,
                      "--method", "attention", "-o", tmp_path / "hm2"]))
    assert "are not the weights the model's training bags were embedded with" in res.stderr
