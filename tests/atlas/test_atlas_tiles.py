"""Tile readers: folders, ImageFolder trees, NPZ/HDF5 arrays, PathoROB metadata; preprocessing."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from tubcli.errors import TubError
from tub_atlas.encoder import Transform
from tub_atlas.synthetic import synthetic_tiles, write_pathorob_layout
from tub_atlas.tiles import read_input, read_pathorob_metadata


def test_flat_folder_parses_slide_and_coordinates(tmp_path):
    img = np.full((16, 16, 3), 200, np.uint8)
    Image.fromarray(img).save(tmp_path / "TCGA-AB-1234_512_1024.png")
    Image.fromarray(img).save(tmp_path / "slideB_x0_y256.jpg")
    ts = read_input(tmp_path)
    rows = {r["slide_id"]: r for r in ts.rows}
    assert (rows["TCGA-AB-1234"]["x"], rows["TCGA-AB-1234"]["y"]) == (512, 1024)
    assert (rows["slideB"]["x"], rows["slideB"]["y"]) == (0, 256)
    assert all(r["label"] == "" for r in ts.rows)
    tiles = ts.read(0, 2)
    assert tiles.shape == (2, 16, 16, 3) and tiles.dtype == np.uint8


def test_image_folder_tree_gives_labels(tmp_path):
    for cls in ("tumor", "normal"):
        (tmp_path / cls / "nested").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / cls / "nested" / "s1_p0.png")
    ts = read_input(tmp_path)
    assert sorted(r["label"] for r in ts.rows) == ["normal", "tumor"]


def test_npz_channels_first_float_and_h5_errors(tmp_path):
    arr = np.random.default_rng(0).random((3, 3, 8, 8)).astype(np.float32)  # (N, 3, H, W) in [0, 1]
    np.savez(tmp_path / "t.npz", images=arr, labels=np.array(["a", "b", "a"]))
    ts = read_input(tmp_path / "t.npz")
    out = ts.read(0, 3)
    assert out.shape == (3, 8, 8, 3) and out.dtype == np.uint8
    assert np.array_equal(out[1, 2, 3], np.round(arr[1, :, 2, 3] * 255).astype(np.uint8))
    assert [r["label"] for r in ts.rows] == ["a", "b", "a"]
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["features"] = np.zeros((2, 4))
    with pytest.raises(TubError, match="no tile dataset"):
        read_input(tmp_path / "bad.h5")
    with pytest.raises(TubError, match="unsupported input"):
        (tmp_path / "x.txt").write_text("hi")
        read_input(tmp_path / "x.txt")


def test_pathorob_metadata_groups_by_center_in_order(tmp_path):
    data = synthetic_tiles(3, 2, 2, 16, seed=0)
    csv_path = write_pathorob_layout(tmp_path, data)
    groups = read_pathorob_metadata(csv_path, None)
    assert sorted(groups) == ["center0", "center1"]
    assert [r["tile_id"] for r in groups["center0"].rows][:2] == ["c0-k0-s0-p0000", "c0-k0-s1-p0001"]
    (tmp_path / "images" / "c0-k0-s0" / "p0000.png").unlink()
    with pytest.raises(TubError, match="no image for slide c0-k0-s0 patch p0000"):
        read_pathorob_metadata(csv_path, None)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,patch_id\na,b\n")
    with pytest.raises(TubError, match="lacks PathoROB columns"):
        read_pathorob_metadata(bad, None)


def test_transform_resizes_shorter_side_crops_and_normalises():
    t = Transform(img_size=32, crop=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((1, 3, 64, 96), 0.75)
    y = t(x)
    assert y.shape == (1, 3, 32, 32)
    assert torch.allclose(y, torch.ones_like(y))  # (0.75 - 0.5) / 0.25, constant image stays constant
    t.crop = False
    assert t.resize(x).shape == (1, 3, 32, 48)
