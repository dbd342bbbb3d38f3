"""Regressions from the second QA sweep: numbered .pt folders whose first file holds one patch,
drop-one on a one-patch bag (spec §2.5 empty-bag rule) for every architecture, float and negative
coords, and where the level-0 tile size came from. Tiny random models, no training."""

import json
import logging

import numpy as np
import pytest
import torch

from tubcli.errors import TubError
from tubcli.testing import invoke

from tub_xmil.bags import is_patch_folder, read_bag
from tub_xmil.checkpoint import build_model
from tub_xmil.explain import drop_one_scores
from tub_xmil.heatmap import geojson, render_overlay, tile_boxes
from tub_xmil.tasks import prediction_score

DIM = 8


def _ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def _feats(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _tub_model(folder):
    """A tub checkpoint folder of an untrained AttnMIL (classification, 2 classes)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = build_model("attnmil", DIM, 2, features_dim=8, inner_attention_dim=4).eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({
        "arch": "attnmil", "task": "classification", "classes": ["0", "1"],
        "kwargs": {"input_dim": DIM, "head_dim": 2, "features_dim": 8, "inner_attention_dim": 4}}))
    return folder


def _h5(path, coords, coord_attrs=None):
    import h5py

    coords = np.asarray(coords)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=_feats(len(coords)))
        d = f.create_dataset("coords", data=coords)
        d.attrs.update(coord_attrs or {})
    return path


# ---------------------------------------------------------------- D1: one-patch slide sorts first
def test_numbered_pt_folder_with_a_one_patch_first_slide_is_a_folder_of_slides(tmp_path):
    model = _tub_model(tmp_path / "m")
    mixed = tmp_path / "pt_mixed"
    mixed.mkdir()
    for sid, n in ((0, 1), (1, 7), (2, 4)):  # (1, D), (7, D), (4, D): three slides
        torch.save(torch.from_numpy(_feats(n, sid)), mixed / f"{sid}.pt")
    assert not is_patch_folder(mixed)
    _ok(invoke(["xmil", "explain", mixed, "--model", model, "--method", "lrp", "-o", tmp_path / "e"]))
    recs = {p.stem: json.loads(p.read_text())["n_patches"] for p in (tmp_path / "e" / "outputs").glob("*.json")}
    assert recs == {"0": 1, "1": 7, "2": 4}
    rows = tmp_path / "rows"  # all (1, D) under xMIL's 0..N-1 names: still one per-patch bag
    rows.mkdir()
    for i, v in enumerate(_feats(3)):
        torch.save(torch.from_numpy(v)[None], rows / f"{i}.pt")
    assert is_patch_folder(rows) and read_bag(rows)[0].shape == (3, DIM)


def test_per_patch_folder_with_an_odd_vector_names_the_file(tmp_path):
    folder = tmp_path / "pp"
    folder.mkdir()
    for i in range(3):
        torch.save(torch.zeros(DIM), folder / f"{i}.pt")
    torch.save(torch.zeros(DIM + 2), folder / "3.pt")
    with pytest.raises(TubError, match=r"^3\.pt: a 10-d vector, but 0\.pt is 8-d") as err:
        read_bag(folder)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- D2: drop-one on a one-patch bag
@pytest.mark.parametrize("arch,kw", [("attnmil", {"features_dim": 8}), ("additivemil", {"features_dim": 8}),
                                     ("transmil", {"n_feat": 16}), ("mambamil", {"features_dim": 8})])
@pytest.mark.parametrize("task,head", [("classification", 2), ("survival", 4)])
def test_drop_on_a_one_patch_bag_uses_the_zero_bag(arch, kw, task, head):
    torch.manual_seed(0)
    m = build_model(arch, DIM, head, **kw).eval()
    x = torch.from_numpy(_feats(1))
    s = drop_one_scores(m, x, task, 1 if task == "classification" else 0)
    with torch.no_grad():  # spec §2.5: the empty bag is the zero bag of the original size
        want = (prediction_score(m(x[None]), task, 1 if task == "classification" else 0)
                - prediction_score(m(torch.zeros(1, 1, DIM)), task, 1 if task == "classification" else 0))
    assert s.shape == (1,) and np.isfinite(s).all()
    np.testing.assert_allclose(s, want.numpy(), rtol=1e-5, atol=1e-6)


def test_geojson_and_scores_json_are_strict_json(tmp_path):
    gj = geojson(np.array([[0, 0], [64, 0]]), np.array([np.nan, 1.0]), 64, "drop", "attribute")
    from tubcli.io import to_json

    text = to_json(gj)
    # QuPath reads a null measurement as an error and a missing one as NaN
    assert "NaN" not in text and json.loads(text)["features"][0]["properties"]["measurements"] == {}
    model = _tub_model(tmp_path / "m")
    bag = _h5(tmp_path / "one.h5", [[256, 256]], coord_attrs={"patch_size_level0": 256})
    _ok(invoke(["xmil", "heatmap", bag, "--model", model, "--method", "drop", "-o", tmp_path / "h"]))
    for name in ("one_drop_scores.json", "one_drop.geojson"):
        json.loads((tmp_path / "h" / "outputs" / name).read_text(),
                   parse_constant=lambda c: pytest.fail(f"{name}: bare {c}"))
    rec = json.loads((tmp_path / "h" / "outputs" / "one_drop_scores.json").read_text())
    assert np.isfinite(rec["scores"]).all()


# ---------------------------------------------------------------- D3: float coords are rounded
def test_float_coords_round_to_the_nearest_pixel(tmp_path):
    from tub_xmil.bags import xmil_metadata
    from tub_xmil.tiling import read_coords_h5

    bag = _h5(tmp_path / "f.h5", np.array([[0.0, 0.4], [127.6, 0.0], [255.9, 383.5]]),
              coord_attrs={"patch_size_level0": 128})
    want = [[0, 0], [128, 0], [256, 384]]
    assert read_bag(bag)[1].tolist() == want and read_coords_h5(bag)[0].tolist() == want
    root = tmp_path / "xroot"
    (root / "features").mkdir(parents=True)
    meta = root / "patches" / "s" / "metadata"
    meta.mkdir(parents=True)
    (meta / "df.csv").write_text('patch_id,position_abs,patch_size_abs\n0,"(127.6, 0.2)",255.7\n1,"(-0.6, 3)",255.7\n')
    coords, attrs = xmil_metadata(root / "features" / "s.pt", 2)
    assert coords.tolist() == [[128, 0], [-1, 3]] and attrs == {"patch_size_level0": 256}


# ---------------------------------------------------------------- D4: negative coords are drawn
def test_tile_with_a_negative_corner_is_drawn_clipped():
    boxes = tile_boxes(np.array([[-128, 0], [128, -300], [-600, 0]]), 256, 32)
    assert boxes.tolist() == [[0, 0, 4, 8], [4, 0, 12, 0], [0, 0, 0, 8]]  # clipped; the last wholly outside
    thumb = np.zeros((8, 20, 3), np.uint8)
    _, heat = render_overlay(thumb, np.array([[-128, 0], [128, 0], [384, 0]]), np.array([1.0, 2.0, 3.0]),
                             256, 32, signed=False)
    assert (heat[:, :4].sum(-1) > 0).all()


# ---------------------------------------------------------------- D5: the tile size's source
def test_inferred_tile_size_warns_and_is_recorded(tmp_path, caplog):
    from tub_xmil.tiling import tile_size_level0_source

    sparse = np.array([[0, 0], [512, 0], [0, 512], [512, 512]])  # 256-px tiles at a 512-px stride?
    log = logging.getLogger("tub.xmil")
    with caplog.at_level(logging.INFO, logger=log.name):
        got = tile_size_level0_source({}, sparse, name="s.h5", log=log)
    assert got == (512, "inferred from the coordinate grid")
    assert any(r.levelno == logging.WARNING and "inferred from the coordinate grid" in r.getMessage()
               for r in caplog.records)
    assert tile_size_level0_source({"patch_size_level0": 256}, sparse)[1] == "attribute"
    assert tile_size_level0_source({}, sparse, override=256) == (256, "--patch-size-level0")
    model = _tub_model(tmp_path / "m")
    _h5(tmp_path / "s.h5", sparse)
    _ok(invoke(["xmil", "heatmap", tmp_path / "s.h5", "--model", model, "--method", "attention",
                "-o", tmp_path / "h"]))
    rec = json.loads((tmp_path / "h" / "outputs" / "s_attention_scores.json").read_text())
    gj = json.loads((tmp_path / "h" / "outputs" / "s_attention.geojson").read_text())
    assert rec["patch_size_level0_source"] == "inferred from the coordinate grid"
    assert gj["properties"] == {"patch_size_level0": 512, "origin_level0": [0, 0],
                                "patch_size_level0_source": "inferred from the coordinate grid"}
    _ok(invoke(["xmil", "heatmap", tmp_path / "s.h5", "--model", model, "--method", "attention",
                "--patch-size-level0", "256", "-o", tmp_path / "h2"]))
    rec = json.loads((tmp_path / "h2" / "outputs" / "s_attention_scores.json").read_text())
    assert rec["patch_size_level0_source"] == "--patch-size-level0"


# ---------------------------------------------------------------- fifth QA sweep: files of other scans and tools
def test_coords_of_another_scan_are_refused_not_embedded_as_white(tmp_path, tiny_encoder):
    """40x tiles reused on the 20x scan of the same slide lay outside it: every feature was white padding
    (exit 0) and the heatmap blank. Now features and heatmap --slide-dir name the mismatch."""
    import h5py

    from tub_xmil.synthetic import render_slide, write_pyramid

    img, _, _ = render_slide(1024, 768, True)
    (tmp_path / "x40").mkdir()
    (tmp_path / "x20").mkdir()
    write_pyramid(tmp_path / "x40" / "s.tiff", img, mpp=0.25, levels=2)
    write_pyramid(tmp_path / "x20" / "s.tiff", img[::2, ::2], mpp=0.5, levels=2)
    _ok(invoke(["xmil", "tile", tmp_path / "x40" / "s.tiff", "--patch-size", "128", "-o", tmp_path / "t40"]))
    res = invoke(["xmil", "features", tmp_path / "x20" / "s.tiff", "--encoder", tiny_encoder, "--coords-dir",
                  tmp_path / "t40", "-o", tmp_path / "f20"])
    assert res.exit_code == 1 and "made for a 1024x768 slide, but s.tiff is 512x384" in res.stderr
    _ok(invoke(["xmil", "features", tmp_path / "x40" / "s.tiff", "--encoder", tiny_encoder, "--coords-dir",
                tmp_path / "t40", "-o", tmp_path / "f40"]))
    bag = tmp_path / "f40" / "outputs" / "features" / "s.h5"
    with h5py.File(bag) as f:
        assert (f.attrs["level0_width"], f.attrs["level0_height"]) == (1024, 768)
    model = _tub_model(tmp_path / "m")
    res = invoke(["xmil", "heatmap", bag, "--model", model, "--slide-dir", tmp_path / "x20", "-o", tmp_path / "h"])
    assert res.exit_code == 1 and "is 512x384" in res.stderr and not list((tmp_path / "h" / "outputs").glob("*.png"))
    plain = tmp_path / "plain.h5"  # a CLAM file records no slide size: the coords themselves must fit
    with h5py.File(bag) as f, h5py.File(plain, "w") as g:
        g["features"], g["coords"] = f["features"][:], f["coords"][:]
        g["coords"].attrs["patch_size"], g["coords"].attrs["patch_level"] = 128, 0
    (tmp_path / "x20" / "plain.tiff").symlink_to(tmp_path / "x20" / "s.tiff")
    res = invoke(["xmil", "heatmap", plain, "--model", model, "--slide-dir", tmp_path / "x20", "-o", tmp_path / "h2"])
    assert res.exit_code == 1 and "coordinates lie outside plain.tiff (512x384" in res.stderr


def test_bags_whose_coords_are_ambiguous_or_miscounted_are_refused(tmp_path):
    import h5py

    torch.save({"coords": torch.zeros(5, 2), "feats": torch.randn(5, DIM)}, tmp_path / "a.pt")
    with pytest.raises(TubError, match=r"a dict without 'features' \(keys: coords, feats\)"):
        read_bag(tmp_path / "a.pt")  # the first tensor was taken: a model of 2-d "features" (the coords)
    coords = torch.tensor([[0, 0], [256, 0], [512, 0], [0, 256], [256, 256]])
    torch.save({"features": torch.randn(5, DIM), "coords": coords}, tmp_path / "b.PT")
    feats, got, _ = read_bag(tmp_path / "b.PT")  # upper-case suffix; the dict's coords are kept
    assert feats.shape == (5, DIM) and np.array_equal(got, coords.numpy())
    with h5py.File(tmp_path / "c.H5", "w") as f:
        f["features"], f["coords"] = _feats(20), np.zeros((15, 2), np.int64)
    with pytest.raises(TubError, match="20 feature rows but 15 coords"):
        read_bag(tmp_path / "c.H5")


def test_heatmap_finds_a_slide_with_an_upper_case_suffix(tmp_path):
    from tub_xmil.cli import _slide_named

    (tmp_path / "S1.SVS").write_bytes(b"")
    (tmp_path / "cm.tif").write_bytes(b"")
    assert _slide_named(tmp_path, "S1") == tmp_path / "S1.SVS"
    assert _slide_named(tmp_path, "cm") == tmp_path / "cm.tif" and _slide_named(tmp_path, "x") is None


def test_a_semicolon_labels_csv_is_named_as_such(tmp_path):
    from pathlib import Path

    from tub_xmil.dataset import read_labels

    (tmp_path / "l.csv").write_text("slide_id;label\na;0\nb;1\n")
    with pytest.raises(TubError, match="is not comma-separated"):
        read_labels(Path(tmp_path / "l.csv"), "classification")
